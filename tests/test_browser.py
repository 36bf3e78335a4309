"""The browser page (static/) against a real server, in headless Chromium.

Sync tests with Playwright's sync API (pytest-trio leaves sync tests alone).
Without /usr/bin/chromium or Playwright they skip, unless
TRIOCHAT_REQUIRE_BROWSER=1 (CI), where they fail.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .server_process import ServerProcess, run_server

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError as exc:  # pragma: no cover - depends on the machine
    PLAYWRIGHT_IMPORT_ERROR: ImportError | None = exc
else:
    PLAYWRIGHT_IMPORT_ERROR = None

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page, ViewportSize

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT = 5_000  # ms, for every expect()
REPO = Path(__file__).resolve().parent.parent
SCREENSHOT = REPO / "docs" / "screenshot.png"
DESKTOP: ViewportSize = {"width": 1000, "height": 700}
PHONE: ViewportSize = {"width": 375, "height": 667}

OpenPage = Callable[..., "Page"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Headless Chromium; skips (or fails when TRIOCHAT_REQUIRE_BROWSER=1) without one."""
    problem = None
    if PLAYWRIGHT_IMPORT_ERROR is not None:
        problem = f"Playwright cannot be imported ({PLAYWRIGHT_IMPORT_ERROR})"
    elif not os.path.exists(CHROMIUM):
        problem = f"{CHROMIUM} is missing (Debian package 'chromium')"
    if problem:
        if os.environ.get("TRIOCHAT_REQUIRE_BROWSER") == "1":
            pytest.fail(
                f"browser tests required (TRIOCHAT_REQUIRE_BROWSER=1) but {problem}", pytrace=False
            )
        pytest.skip(f"browser tests skipped: {problem}")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def server() -> Iterator[ServerProcess]:
    """A fresh server per test (names are server-wide), with a short presence grace."""
    with run_server("--presence-grace", "0.5") as srv:
        yield srv


@pytest.fixture
def open_page(browser: Browser, server: ServerProcess) -> Iterator[OpenPage]:
    """Factory: a page in its own browser context (own cookies, own WebSocket), at `/`.

    Fails the test if any of its pages logs a console error or throws.
    """
    contexts = []
    problems: list[str] = []

    def factory(viewport: ViewportSize = DESKTOP, **options: Any) -> Page:
        context = browser.new_context(viewport=viewport, **options)
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda err: problems.append(f"uncaught: {err}"))
        page.on(
            "console",
            lambda msg: problems.append(f"console: {msg.text}") if msg.type == "error" else None,
        )
        page.goto(server.base_url + "/")
        return page

    yield factory
    for context in contexts:
        context.close()
    assert not problems, f"the page reported errors: {problems}"


def join(page: Page, name: str, room: str = "lobby") -> None:
    page.fill("#name", name)
    page.fill("#room", room)
    page.click("#join")
    expect(page.locator("#status")).to_have_text("connected", timeout=TIMEOUT)
    expect(page.locator("#input")).to_be_enabled(timeout=TIMEOUT)
    # The input is enabled while the join form still shows: wait for the chat
    # view, which appears once `joined` arrived.
    expect(page.locator("#input")).to_be_visible(timeout=TIMEOUT)


def say(page: Page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")
    expect(page.locator("#input")).to_have_value("", timeout=TIMEOUT)


def members(page: Page) -> Any:
    return expect(page.locator("#members li"))


def test_page_two_users_chat_presence_and_typing(open_page: OpenPage) -> None:
    """Two users see each other, each other's messages ((me) on one's own) and typing."""
    alice, bob = open_page(), open_page()
    join(alice, "alice")
    join(bob, "bob")
    members(alice).to_have_text(["alice", "bob"], timeout=TIMEOUT)
    members(bob).to_have_text(["alice", "bob"], timeout=TIMEOUT)
    expect(alice.locator("#messages .sys", has_text="bob joined")).to_be_visible(timeout=TIMEOUT)

    say(alice, "hello bob")
    on_bob = bob.locator("#messages .msg").last
    expect(on_bob.locator(".msg-name")).to_have_text("alice", timeout=TIMEOUT)
    expect(on_bob.locator(".msg-text")).to_have_text("hello bob", timeout=TIMEOUT)
    expect(on_bob).not_to_have_class(re.compile(r"\bmine\b"))
    mine = alice.locator("#messages .msg.mine").last
    expect(mine.locator(".msg-text")).to_have_text("hello bob", timeout=TIMEOUT)
    expect(mine.locator(".msg-me")).to_have_text("(me)", timeout=TIMEOUT)
    expect(mine.locator(".msg-time")).to_have_text(re.compile(r"^\d\d:\d\d$"))

    # A whisper (not typed as text: "/" commands send no `typing`).
    bob.fill("#input", "/w alice lunch at noon?")
    bob.press("#input", "Enter")
    whisper = alice.locator("#messages .msg.whisper").last
    expect(whisper.locator(".msg-name")).to_have_text("bob → alice", timeout=TIMEOUT)
    expect(whisper.locator(".msg-text")).to_have_text("lunch at noon?", timeout=TIMEOUT)

    bob.locator("#input").press_sequentially("hi alice")
    expect(alice.locator("#typing")).to_have_text("bob is typing…", timeout=TIMEOUT)
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    alice.screenshot(path=str(SCREENSHOT))

    bob.press("#input", "Enter")
    reply = alice.locator("#messages .msg").last
    expect(reply.locator(".msg-name")).to_have_text("bob", timeout=TIMEOUT)
    expect(reply.locator(".msg-text")).to_have_text("hi alice", timeout=TIMEOUT)
    expect(reply).not_to_have_class(re.compile(r"\bmine\b"))
    expect(alice.locator("#typing")).to_be_empty(timeout=TIMEOUT)
    expect(bob.locator("#messages .msg.mine .msg-text")).to_have_text(
        ["lunch at noon?", "hi alice"]
    )


def test_page_renders_html_payloads_as_text(open_page: OpenPage) -> None:
    """Names and messages carrying HTML are shown literally and run no script."""
    name = "<img src=x onerror=__xss=1>"  # fits the 32-character name limit
    text = '<img src=x onerror="window.__xss=1"> <b>bold</b>'
    mallory, bob = open_page(), open_page()
    join(bob, "bob")
    join(mallory, name)
    say(mallory, text)
    for page in (mallory, bob):
        row = page.locator("#messages .msg").last
        expect(row.locator(".msg-name")).to_have_text(name, timeout=TIMEOUT)
        expect(row.locator(".msg-text")).to_have_text(text, timeout=TIMEOUT)
        members(page).to_have_text([name, "bob"], timeout=TIMEOUT)
        expect(page.locator("body img, body b")).to_have_count(0)
        assert page.evaluate("typeof window.__xss") == "undefined"
    # Control: the same payload inserted as HTML does run (on a blank page: the
    # server's Content-Security-Policy would block it), so the check above means something.
    control = bob.context.new_page()
    control.evaluate("t => { document.body.insertAdjacentHTML('beforeend', t); }", text)
    control.wait_for_function("window.__xss === 1", timeout=TIMEOUT)


def test_page_closed_page_leaves_members_after_grace(open_page: OpenPage) -> None:
    """When bob closes his page, alice's members list drops him after the presence grace."""
    alice, bob = open_page(), open_page()
    join(alice, "alice")
    join(bob, "bob")
    members(alice).to_have_text(["alice", "bob"], timeout=TIMEOUT)
    bob.context.close()
    members(alice).to_have_text(["alice"], timeout=TIMEOUT)
    expect(alice.locator("#messages .sys", has_text="bob left")).to_be_visible(timeout=TIMEOUT)


def test_page_leave_button_returns_to_join_form(open_page: OpenPage) -> None:
    """The Leave button leaves the room at once and shows the join form again."""
    alice, bob = open_page(), open_page()
    join(alice, "alice")
    join(bob, "bob")
    members(alice).to_have_text(["alice", "bob"], timeout=TIMEOUT)
    bob.click("#leave")
    expect(bob.locator("#join")).to_be_visible(timeout=TIMEOUT)
    expect(bob.locator("#input")).to_be_hidden()
    members(alice).to_have_text(["alice"], timeout=TIMEOUT)
    join(bob, "bobby", "lobby")  # a new identity after leaving
    members(alice).to_have_text(["alice", "bobby"], timeout=TIMEOUT)


def test_page_shows_client_and_server_errors(open_page: OpenPage) -> None:
    """Invalid join input is explained before sending; server errors show as inline lines."""
    page = open_page()
    page.fill("#name", "alice")
    page.fill("#room", "Not A Room")
    page.click("#join")
    expect(page.locator("#join-error")).to_contain_text("Room names", timeout=TIMEOUT)
    expect(page.locator("#status")).to_have_text("not connected")
    page.fill("#name", "   ")
    page.fill("#room", "lobby")
    page.click("#join")
    expect(page.locator("#join-error")).to_contain_text("name", timeout=TIMEOUT)
    join(page, "alice")
    say(page, "/w nobody hello?")
    expect(page.locator("#messages .sys.error")).to_have_count(1, timeout=TIMEOUT)
    expect(page.locator("#messages .sys.error")).to_have_attribute("data-code", "no_such_user")


def test_page_serves_at_root_and_works_on_a_phone(open_page: OpenPage) -> None:
    """`/` serves the page (title "triochat"); at 375x667 it is usable by keyboard."""
    page = open_page(PHONE, is_mobile=True, has_touch=True)
    expect(page).to_have_title(re.compile("triochat", re.IGNORECASE))
    for hook in ("#name", "#room", "#join"):
        expect(page.locator(hook)).to_be_in_viewport(timeout=TIMEOUT)
    # Keyboard only: the name field has focus, Tab order is name → room → Join.
    expect(page.locator("#name")).to_be_focused(timeout=TIMEOUT)
    page.keyboard.type("alice")
    page.keyboard.press("Tab")
    expect(page.locator("#room")).to_be_focused()
    expect(page.locator("#room")).to_have_value("lobby")
    page.keyboard.press("Tab")
    expect(page.locator("#join")).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.locator("#input")).to_be_focused(timeout=TIMEOUT)
    for hook in ("#input", "#send", "#leave", "#status"):
        expect(page.locator(hook)).to_be_in_viewport(timeout=TIMEOUT)
    page.keyboard.type("hi from my phone")
    page.keyboard.press("Enter")
    expect(page.locator("#messages .msg.mine .msg-text")).to_have_text(
        ["hi from my phone"], timeout=TIMEOUT
    )
    members(page).to_have_text(["alice"], timeout=TIMEOUT)
    # Narrow layout: members sit under the messages, and nothing scrolls sideways.
    messages_box = page.locator("#messages").bounding_box()
    members_box = page.locator("#members").bounding_box()
    assert messages_box
    assert members_box
    assert members_box["y"] >= messages_box["y"] + messages_box["height"]
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
