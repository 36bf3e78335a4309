"""Writing in the page (#15): a composer that grows with its text, Enter sends and
Shift+Enter adds a line, and the message length limit taken from the server's
`joined.limits` (``{"msg_chars": N}``) when it sends one, else the default 2000.

One test runs a real server with ``--max-msg-chars 50``: the limit goes from the
command line through `joined.limits` to the composer. Two rewrite the server's
`joined` frames on the way to the page (Playwright's WebSocket routing): one sets
other `limits`, one removes them, as a server without the extension would send
them, so the page's fallback is what is tested; tests/test_protocol_e2e.py checks
the server sends them.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

from .server_process import ServerProcess
from .test_browser import (  # noqa: F401 (fixtures)
    TIMEOUT,
    OpenAt,
    browser,
    checked_server,
    join,
    open_at,
)
from .test_browser_resilience import record_sent

if TYPE_CHECKING:
    from playwright.sync_api import Page, WebSocketRoute

with contextlib.suppress(ImportError):
    from playwright.sync_api import expect

pytestmark = pytest.mark.browser


@pytest.fixture
def server() -> Iterator[ServerProcess]:
    with checked_server("--presence-grace", "0.5") as srv:
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


def with_limits(limits: dict[str, Any] | None, joined: list[dict[str, Any]] | None = None) -> Any:
    """A WebSocket route that sets ``limits`` in every `joined` from the server (None:
    removes them), and keeps each `joined` as the page gets it in ``joined``."""

    def route(ws: WebSocketRoute) -> None:
        server = ws.connect_to_server()

        def to_page(message: str | bytes) -> None:
            frame = json.loads(message)
            if frame.get("type") == "joined":
                if limits is None:
                    frame.pop("limits", None)
                else:
                    frame["limits"] = limits
                if joined is not None:
                    joined.append(frame)
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


def test_page_message_limit_is_the_servers_max_msg_chars(
    open_at: OpenAt,  # noqa: F811 (the imported fixture)
) -> None:
    """End to end, no rewriting: a server started with ``--max-msg-chars 50`` says so in
    `joined.limits`, and the composer counts toward 50 (shown from 40, 80 %), refuses
    a 51-character message before sending it and sends one of 50."""
    with checked_server("--presence-grace", "0.5", "--max-msg-chars", "50") as srv:
        page = open_at(srv.base_url + "/")
        received: list[dict[str, Any]] = []
        page.on(
            "websocket",
            lambda ws: ws.on(
                "framereceived", lambda payload: received.append(json.loads(payload))
            ),
        )
        sent = record_sent(page)
        join(page, "alice")
        joined = [f for f in received if f["type"] == "joined"]
        assert joined
        assert joined[0]["limits"]["msg_chars"] == 50, joined[0]
        box = page.locator("#input")
        counter = page.locator("#char-count")
        expect(box).to_have_attribute("data-max", "50")
        box.fill("x" * 39)
        expect(counter).to_be_hidden()
        box.fill("x" * 40)
        expect(counter).to_have_text("40 of 50 characters")
        expect(counter).to_be_visible()
        box.fill("x" * 51)
        expect(counter).to_have_text("51 of 50 characters")
        expect(counter).to_have_class(re.compile(r"\bover\b"))
        box.press("Enter")
        error = page.locator("#messages .sys.error")
        expect(error).to_have_text("Not sent: The message is too long (at most 50 characters).")
        expect(error).to_have_attribute("data-code", "too_long")
        expect(box).to_have_value("x" * 51)
        assert [f for f in sent if f["type"] == "say"] == []
        box.fill("z" * 50)
        box.press("Enter")
        expect(page.locator("#messages .msg.mine:not(.pending) .msg-text")).to_have_text(
            ["z" * 50], timeout=TIMEOUT
        )
        expect(counter).to_be_hidden()
        assert [f["msg"] for f in sent if f["type"] == "say"] == ["z" * 50]
        page.context.close()  # before the server stops: no reconnect attempts to report


def test_page_message_limit_defaults_to_2000(
    open_at: OpenAt,  # noqa: F811 (the imported fixture)
) -> None:
    """Without `joined.limits` (removed from the server's `joined` on the way to the
    page, as a server without the extension sends it) the limit is the default 2000,
    though this server takes 3000: the page counts toward 2000 and refuses 2001
    characters itself, without sending them."""
    with checked_server("--presence-grace", "0.5", "--max-msg-chars", "3000") as srv:
        page = open_at(srv.base_url + "/")
        joined: list[dict[str, Any]] = []
        page.route_web_socket(re.compile(r"/ws$"), with_limits(None, joined))
        page.reload()
        sent = record_sent(page)
        join(page, "alice")
        assert joined
        assert all("limits" not in f for f in joined), joined
        box = page.locator("#input")
        expect(box).to_have_attribute("data-max", "2000")
        box.fill("a" * 1700)
        expect(page.locator("#char-count")).to_have_text("1700 of 2000 characters")
        box.fill("a" * 2001)
        box.press("Enter")
        error = page.locator("#messages .sys.error")
        expect(error).to_have_text("Not sent: The message is too long (at most 2000 characters).")
        expect(error).to_have_attribute("data-code", "too_long")
        assert [f for f in sent if f["type"] == "say"] == []
        box.fill("a" * 2000)
        box.press("Enter")
        expect(page.locator("#messages .msg.mine:not(.pending) .msg-text")).to_have_text(
            ["a" * 2000], timeout=TIMEOUT
        )
        page.context.close()  # before the server stops: no reconnect attempts to report
