"""Writing in the page (#15): a composer that grows with its text, Enter sends and
Shift+Enter adds a line, and the message length limit taken from the server's
`joined.limits` (``{"msg_chars": N}``) when it sends one, else the default 2000.

One test rewrites `limits` in the server's `joined` frames on the way to the page
(Playwright's WebSocket routing), so the page's reading of them is what is tested;
tests/test_protocol_e2e.py checks the server sends them.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

from .server_process import ServerProcess, run_server
from .test_browser import TIMEOUT, OpenAt, browser, join, open_at  # noqa: F401 (fixtures)
from .test_browser_resilience import record_sent

if TYPE_CHECKING:
    from playwright.sync_api import Page, WebSocketRoute

with contextlib.suppress(ImportError):
    from playwright.sync_api import expect

pytestmark = pytest.mark.browser


@pytest.fixture
def server() -> Iterator[ServerProcess]:
    with run_server("--presence-grace", "0.5") as srv:
        yield srv


def height(page: Page) -> float:
    return float(page.locator("#input").evaluate("el => el.getBoundingClientRect().height"))


def test_page_composer_grows_enter_sends_shift_enter_adds_a_line(
    server: ServerProcess,
    open_at: OpenAt,  # noqa: F811 (the imported fixture)
) -> None:
    """Shift+Enter starts a new line and the box grows with it (up to a cap, then it
    scrolls); Enter sends the whole text as one message and the box shrinks back."""
    page = open_at(server.base_url + "/")
    join(page, "alice")
    one_line = height(page)
    box = page.locator("#input")
    box.press_sequentially("first line")
    box.press("Shift+Enter")
    box.press_sequentially("second line")
    expect(box).to_have_value("first line\nsecond line")
    two_lines = height(page)
    assert two_lines > one_line + 10, (one_line, two_lines)
    for n in range(20):
        box.press("Shift+Enter")
        box.press_sequentially(f"more {n}")
    capped = height(page)
    assert two_lines < capped <= 210, capped
    assert box.evaluate("el => el.scrollHeight > el.clientHeight")
    box.press("Enter")
    expect(box).to_have_value("", timeout=TIMEOUT)
    text = page.locator("#messages .msg.mine .msg-text").last
    expect(text).to_have_text(
        "first line\nsecond line" + "".join(f"\nmore {n}" for n in range(20)), timeout=TIMEOUT
    )
    assert height(page) == one_line
    # Shift+Enter alone never sends.
    box.press("Shift+Enter")
    box.press("Shift+Enter")
    expect(page.locator("#messages .msg.mine")).to_have_count(1)


def with_limits(limits: dict[str, Any]) -> Any:
    """A WebSocket route that adds ``limits`` to every `joined` from the server."""

    def route(ws: WebSocketRoute) -> None:
        server = ws.connect_to_server()

        def to_page(message: str | bytes) -> None:
            frame = json.loads(message)
            if frame.get("type") == "joined":
                frame["limits"] = limits
            ws.send(json.dumps(frame))

        server.on_message(to_page)
        ws.on_message(lambda message: server.send(message))

    return route


def test_page_message_limit_comes_from_joined_limits(
    server: ServerProcess,
    open_at: OpenAt,  # noqa: F811 (the imported fixture)
) -> None:
    """With `joined.limits` = {"msg_chars": 40} the page counts toward 40 (code points),
    refuses a 41-character message before sending it and keeps the text to fix."""
    page = open_at(server.base_url + "/")
    page.route_web_socket(re.compile(r"/ws$"), with_limits({"msg_chars": 40}))
    page.reload()
    sent = record_sent(page)
    join(page, "alice")
    box = page.locator("#input")
    counter = page.locator("#char-count")
    box.fill("🙂" * 30)  # 30 code points: under 80 % of 40, no counter yet
    expect(counter).to_be_hidden()
    box.fill("🙂" * 35)
    expect(counter).to_have_text("35 of 40 characters")
    expect(counter).to_be_visible()
    box.fill("x" * 41)
    expect(counter).to_have_text("41 of 40 characters")
    expect(counter).to_have_class(re.compile(r"\bover\b"))
    box.press("Enter")
    error = page.locator("#messages .sys.error")
    expect(error).to_have_text("Not sent: The message is too long (at most 40 characters).")
    expect(error).to_have_attribute("data-code", "too_long")
    expect(box).to_have_value("x" * 41)
    assert [f for f in sent if f["type"] == "say"] == []
    box.fill("y" * 40)
    box.press("Enter")
    expect(page.locator("#messages .msg.mine:not(.pending) .msg-text")).to_have_text(
        ["y" * 40], timeout=TIMEOUT
    )
    expect(counter).to_be_hidden()


def test_page_message_limit_defaults_to_2000(
    server: ServerProcess,
    open_at: OpenAt,  # noqa: F811 (the imported fixture)
) -> None:
    """Without `joined.limits` (today's server) the limit is the default 2000."""
    page = open_at(server.base_url + "/")
    join(page, "alice")
    box = page.locator("#input")
    box.fill("a" * 1700)
    expect(page.locator("#char-count")).to_have_text("1700 of 2000 characters")
    box.fill("a" * 2001)
    box.press("Enter")
    expect(page.locator("#messages .sys.error")).to_have_attribute("data-code", "too_long")
    box.fill("a" * 2000)
    box.press("Enter")
    expect(page.locator("#messages .msg.mine:not(.pending) .msg-text")).to_have_text(
        ["a" * 2000], timeout=TIMEOUT
    )
