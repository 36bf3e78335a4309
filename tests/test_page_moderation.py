"""The page under moderation through the server API (docs/protocol.md §16): a message
an operator deletes leaves the page (a short "Message deleted." line takes its place),
and an operator's disconnect (close 4009) stops the page for good, saying so, with the
composer disabled and no new connection.

Headless Chromium (the `browser` fixture of test_browser.py, with its skip/fail
policy) against a real server started with --api-key; the operator's calls are
plain HTTP requests, and what the server holds afterwards is read back from the API.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

from .server_process import ServerProcess, run_server
from .test_browser import TIMEOUT, OpenAt, browser, join, open_at, say  # noqa: F401 (fixtures)
from .test_browser_resilience import observer, texts
from .test_page_look import assert_accessible

if TYPE_CHECKING:
    from playwright.sync_api import Page

with contextlib.suppress(ImportError):
    from playwright.sync_api import expect

pytestmark = pytest.mark.browser

API_KEY = "page-moderation-test-key"  # a test-only key (at least 16 characters)
GRACE = 0.5  # --presence-grace, seconds
# No direct HTTP to 127.0.0.1 through a proxy from the environment.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture
def server() -> Iterator[ServerProcess]:
    """Anonymous chat (no token key), with the server API on."""
    with run_server("--presence-grace", str(GRACE), "--api-key", API_KEY) as srv:
        yield srv


def api(server: ServerProcess, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """One server API call with the key: its status and its JSON body (None if empty)."""
    request = urllib.request.Request(
        server.base_url + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    try:
        with OPENER.open(request, timeout=5) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def members(server: ServerProcess, room: str = "lobby") -> list[str]:
    status, body = api(server, "GET", f"/api/presence?room={room}")
    assert status == 200, body
    result: list[str] = body["members"]
    return result


def wait_for_members(server: ServerProcess, expected: list[str], timeout: float = 5.0) -> None:
    """Poll the server's presence until it is ``expected`` (a leave waits out the grace)."""
    deadline = time.monotonic() + timeout
    while (now := members(server)) != expected:
        assert time.monotonic() < deadline, f"members stayed {now}, not {expected}"
        time.sleep(0.05)


def join_over(page: Page, name: str) -> None:
    """Join lobby as ``name`` over whichever transport the page uses (its status says which)."""
    page.fill("#name", name)
    page.click("#join")
    expect(page.locator("#status")).to_have_text(re.compile(r"^connected"), timeout=TIMEOUT)
    expect(page.locator("#input")).to_be_visible(timeout=TIMEOUT)
    expect(page.locator("#input")).to_be_enabled(timeout=TIMEOUT)


def log_rows(page: Page) -> list[str]:
    """The log's messages and deletion lines, in order: message texts and ``[…]`` lines."""
    result: list[str] = page.evaluate(
        """() => [...document.querySelectorAll('#messages > .msg, #messages > .sys.deleted')]
              .map((r) => r.classList.contains('msg')
                ? r.querySelector('.msg-text').textContent : `[${r.textContent}]`)"""
    )
    return result


def test_page_removes_messages_an_operator_deleted(server: ServerProcess, open_at: OpenAt) -> None:  # noqa: F811
    """DELETE /api/messages/<id> takes the message out of the page (its text and its label
    with it) and leaves "Message deleted." in its place; a deletion next to it shares the
    line. After a reload neither comes back, and no gap is reported."""
    page = open_at(server.base_url + "/")
    join(page, "alice")
    with observer(server.port, "bob") as bob:
        bob.say("first")
        spam = bob.say("buy cheap spam")
        last = bob.say("more spam")
        texts(page).to_have_text(["first", "buy cheap spam", "more spam"], timeout=TIMEOUT)

        assert api(server, "DELETE", f"/api/messages/{spam}?room=lobby") == (204, None)
        texts(page).to_have_text(["first", "more spam"], timeout=TIMEOUT)
        assert log_rows(page) == ["first", "[Message deleted.]", "more spam"]
        # Nothing of it is left for a screen reader either.
        expect(page.locator('#messages [aria-label*="cheap spam"]')).to_have_count(0)
        assert "cheap spam" not in page.locator("#log").inner_text()
        # The message after the line starts a new group: its name shows again.
        expect(page.locator("#messages > .msg").last).not_to_have_class("grouped")
        assert_accessible(page, "a deleted message")

        assert api(server, "DELETE", f"/api/messages/{last}?room=lobby") == (204, None)
        expect(page.locator("#messages .sys.deleted")).to_have_text(
            ["2 messages deleted."], timeout=TIMEOUT
        )
        assert log_rows(page) == ["first", "[2 messages deleted.]"]
        deleted = bob.wait_for(lambda f: f["type"] == "deleted" and f["id"] == last)
        assert deleted == {"type": "deleted", "room": "lobby", "id": last}

        # A reload resumes from the last message that is still there.
        page.reload()
        expect(page.locator("#status")).to_have_text("connected", timeout=TIMEOUT)
        texts(page).to_have_text(["first"], timeout=TIMEOUT)
        expect(page.locator("#messages .sys.gap")).to_have_count(0)
        say(page, "still here")
        bob.wait_for(lambda f: f["type"] == "message" and f["msg"] == "still here")


@pytest.mark.parametrize("transport", ["ws", "sse"])
def test_page_stops_for_good_when_an_operator_disconnects_it(
    server: ServerProcess,
    open_at: OpenAt,  # noqa: F811
    transport: str,
) -> None:
    """POST /api/disconnect with the page's name closes it with 4009: the page says "An
    operator disconnected you." (a line and the status), disables the composer, offers no
    retry and opens no new connection: the server lets the name go after the grace."""
    page = open_at(f"{server.base_url}/?transport={transport}")
    opened: list[str] = []
    page.on("websocket", lambda ws: opened.append(ws.url))
    page.on(
        "request",
        lambda r: opened.append(r.url) if r.method == "GET" and r.url.endswith("/sse") else None,
    )
    join_over(page, "alice")
    assert len(opened) == 1, opened
    assert members(server) == ["alice"]

    assert api(server, "POST", "/api/disconnect", {"user": "alice"}) == (204, None)
    expect(page.locator("#status")).to_have_text("disconnected by an operator", timeout=TIMEOUT)
    line = page.locator("#messages .sys.error")
    expect(line).to_have_text(["An operator disconnected you."])
    expect(line).to_have_attribute("data-code", "disconnected")
    expect(page.locator("#announcer > p").last).to_have_text("An operator disconnected you.")
    expect(page.locator("#input")).to_be_disabled()
    expect(page.locator("#send")).to_be_disabled()
    expect(page.locator("#retry")).to_be_hidden()
    assert_accessible(page, "disconnected by an operator")

    # A reconnect within the grace would keep alice a member: she leaves instead...
    wait_for_members(server, [])
    # ... and stays away (the page's first retry would come within 0.5 s).
    page.wait_for_timeout(1000)
    assert members(server) == []
    assert len(opened) == 1, opened
    expect(page.locator("#status")).to_have_text("disconnected by an operator")
    expect(line).to_have_count(1)
