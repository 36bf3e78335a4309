"""The browser page (static/) against a real server, in headless Chromium.

Sync tests with Playwright's sync API (pytest-trio leaves sync tests alone).
Without /usr/bin/chromium or Playwright they skip, unless
TRIOCHAT_REQUIRE_BROWSER=1 (CI), where they fail.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import pytest

from .server_process import ServerProcess, run_server

try:
    from playwright.sync_api import expect, sync_playwright
    from websockets.sync.client import ClientConnection
    from websockets.sync.client import connect as ws_connect
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


def server_problem(srv: ServerProcess) -> str | None:
    """What went wrong with the server on its side: it exited, or it logged a bug."""
    if srv.proc.poll() is not None:
        return f"the server exited during the test (exit code {srv.proc.returncode})"
    if "Traceback (most recent call last)" in srv.output_text():
        return "the server logged a traceback"
    return None


@contextmanager
def checked_server(*args: str, **options: Any) -> Iterator[ServerProcess]:
    """`run_server`, and at the end: the server still runs and logged no bug. Checked
    also when the test failed (both are reported then), so a page that "can't reach
    the server" comes with the server's own account: killed, crashed, or a bug."""
    with run_server(*args, **options) as srv:
        try:
            yield srv
        finally:
            problem = server_problem(srv)
            if problem:
                raise AssertionError(f"{problem}; its output:\n{srv.output_text()}")


@pytest.fixture
def server() -> Iterator[ServerProcess]:
    """A fresh server per test (names are server-wide), with a short presence grace."""
    with checked_server("--presence-grace", "0.5") as srv:
        yield srv


def watch_page(page: Page, problems: list[str]) -> None:
    """Note in ``problems`` whatever goes wrong in ``page``: an uncaught error, a
    console error (a 404 or a refused request shows as one too), or a request that
    fails (an aborted one, as on closing a page, excepted) (#15)."""
    page.on("pageerror", lambda err: problems.append(f"uncaught: {err}"))
    page.on(
        "console",
        lambda msg: (
            problems.append(f"console: {msg.text} ({msg.location.get('url')})")
            if msg.type == "error"
            else None
        ),
    )
    page.on(
        "requestfailed",
        lambda r: (
            problems.append(f"request failed: {r.method} {r.url} {r.failure}")
            if r.failure and "ERR_ABORTED" not in r.failure
            else None
        ),
    )


@pytest.fixture
def open_page(browser: Browser, server: ServerProcess) -> Iterator[OpenPage]:
    """Factory: a page in its own browser context (own cookies, own WebSocket), at `/`.

    Fails the test if any of its pages throws, logs a console error, or has a
    request fail (see `watch_page`).
    """
    contexts = []
    problems: list[str] = []

    def factory(viewport: ViewportSize = DESKTOP, **options: Any) -> Page:
        context = browser.new_context(viewport=viewport, **options)
        contexts.append(context)
        page = context.new_page()
        watch_page(page, problems)
        page.goto(server.base_url + "/")
        return page

    yield factory
    for context in contexts:
        context.close()
    assert not problems, f"the page reported errors: {problems}"


OpenAt = Callable[..., "Page"]


@pytest.fixture
def open_at(browser: Browser) -> Iterator[OpenAt]:
    """Factory: ``open_at(url, viewport=..., context=None, **context_options)`` opens a
    page at ``url``, in a new browser context or in ``context`` (a second tab).

    Fails the test if any of its pages throws, logs a console error, or has a
    request fail (see `watch_page`).
    """
    contexts = []
    problems: list[str] = []

    def factory(
        url: str, viewport: ViewportSize = DESKTOP, context: Any = None, **options: Any
    ) -> Page:
        if context is None:
            context = browser.new_context(viewport=viewport, **options)
            contexts.append(context)
        page = context.new_page()
        watch_page(page, problems)
        page.goto(url)
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
    # Merged with his join notice when nothing came between (#18).
    left = re.compile(r"\bbob (joined and )?left$")
    expect(alice.locator("#messages .sys", has_text=left)).to_be_visible(timeout=TIMEOUT)


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
    # Narrow layout (#15): the members are behind a toggle (opened and closed by
    # keyboard), the composer sits at the bottom of the screen under the messages,
    # and nothing scrolls sideways.
    expect(page.locator("#members")).to_be_hidden()
    page.locator("#members-toggle").focus()
    page.keyboard.press("Enter")
    expect(page.locator("#members")).to_be_in_viewport(timeout=TIMEOUT)
    members(page).to_have_text(["alice"])
    page.keyboard.press("Escape")
    expect(page.locator("#members")).to_be_hidden()
    expect(page.locator("#members-toggle")).to_be_focused()
    messages_box = page.locator("#messages").bounding_box()
    composer_box = page.locator("#input").bounding_box()
    assert messages_box
    assert composer_box
    assert composer_box["y"] >= messages_box["y"] + messages_box["height"]
    assert composer_box["y"] + composer_box["height"] >= PHONE["height"] - 70, composer_box
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]


# --- #18: the SSE session out of the URL, bidi isolation, presence churn ------

APP_JS = REPO / "src" / "triochat" / "static" / "app.js"
#: The page's cap on presence lines, read from app.js so the two cannot drift.
PRESENCE_LINES_MAX = int(
    re.search(r"PRESENCE_LINES_MAX = (\d+)", APP_JS.read_text()).group(1)  # type: ignore[union-attr]
)


class RawChat:
    """A raw WebSocket chat client driven from the test (websockets' sync client)."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self._refs = 0

    def request(self, frame: dict[str, Any], answer: str) -> dict[str, Any]:
        """Send ``frame`` with a fresh ref and return the ``answer`` frame that echoes it."""
        self._refs += 1
        ref = f"raw-{self._refs}"
        self.ws.send(json.dumps({**frame, "ref": ref}))
        deadline = time.monotonic() + TIMEOUT / 1000
        while True:
            got: dict[str, Any] = json.loads(
                self.ws.recv(timeout=max(deadline - time.monotonic(), 0.001))
            )
            if got.get("ref") == ref:
                assert got["type"] == answer, got
                return got

    def join(self, name: str, room: str = "lobby") -> dict[str, Any]:
        return self.request({"type": "join", "room": room, "name": name}, "joined")

    def leave(self, room: str = "lobby") -> None:
        self.request({"type": "leave", "room": room}, "left")

    def say(self, text: str, room: str = "lobby") -> None:
        self.request({"type": "say", "room": room, "msg": text}, "ack")


@contextmanager
def raw_chat(port: int) -> Iterator[RawChat]:
    # max_queue=None: a client that does not read its frames still reads the
    # socket, so its close handshake is never stuck behind them.
    with ws_connect(f"ws://127.0.0.1:{port}/ws", open_timeout=5, max_queue=None) as ws:
        yield RawChat(ws)


def test_page_sse_posts_name_the_session_in_a_header_not_the_url(
    open_page: OpenPage, server: ServerProcess
) -> None:
    """Over SSE the page POSTs to /sse with X-Triochat-Session; no URL carries the id (#18)."""
    page = open_page()
    requests: list[Any] = []
    page.on("request", lambda request: requests.append(request))
    page.goto(server.base_url + "/?transport=sse")
    page.fill("#name", "sue")
    page.click("#join")
    expect(page.locator("#status")).to_have_text("connected (SSE)", timeout=TIMEOUT)
    expect(page.locator("#input")).to_be_visible(timeout=TIMEOUT)
    say(page, "over SSE")
    expect(page.locator("#messages .msg.mine:not(.pending) .msg-text")).to_have_text(
        ["over SSE"], timeout=TIMEOUT
    )
    posts = [r for r in requests if r.method == "POST"]
    assert len(posts) >= 2, [r.url for r in requests]  # the join and the say
    sessions = {r.headers.get("x-triochat-session") for r in posts}
    assert len(sessions) == 1, sessions
    session = sessions.pop()
    assert session
    assert len(session) >= 20
    for r in posts:
        assert (urlsplit(r.url).path, urlsplit(r.url).query) == ("/sse", ""), r.url
    assert not [r.url for r in requests if session in r.url]


#: Displays as "pay to live.google now" where the override is obeyed.
SPOOF = "pay to \u202eelgoog.evil\u202c now"

# Left edges of the characters of "elgoog.evil" in an element's first text node.
CHAR_LEFTS = """(el) => {
  const node = el.firstChild;
  const start = node.data.indexOf('elgoog.evil');
  const lefts = [];
  for (let i = start; i < start + 11; i++) {
    const range = document.createRange();
    range.setStart(node, i);
    range.setEnd(node, i + 1);
    lefts.push(range.getBoundingClientRect().left);
  }
  return lefts;
}"""

# Left edges of an element's child elements, in document order.
CHILD_LEFTS = "(el) => [...el.children].map((c) => c.getBoundingClientRect().left)"


def test_page_neutralises_bidi_in_user_text(open_page: OpenPage, server: ServerProcess) -> None:
    """A bidi override in a message shows as a visible escape and does not reorder the
    text; right-to-left names are isolated, so a list of them keeps its order (#18)."""
    alice = open_page()
    join(alice, "alice")
    rtl = ["שרה", "דוד", "אבי"]  # right-to-left names
    with raw_chat(server.port) as mallory:
        mallory.join("mallory")
        mallory.say(SPOOF)
        row = alice.locator("#messages .msg").last
        text = row.locator(".msg-text")
        expect(text).to_have_text("pay to [U+202E]elgoog.evil[U+202C] now", timeout=TIMEOUT)
        expect(text).to_have_attribute("dir", "auto")
        lefts = text.evaluate(CHAR_LEFTS)
        assert lefts == sorted(lefts), lefts  # laid out in logical order
        expect(row.locator(".msg-name bdi")).to_have_text("mallory")
        # Three right-to-left names in one notice: "A, B and C joined".
        with raw_chat(server.port) as one, raw_chat(server.port) as two:
            with raw_chat(server.port) as three:
                for client, name in zip((one, two, three), rtl, strict=True):
                    client.join(name)
                notice = alice.locator("#messages .sys.presence").last
                expect(notice).to_have_text(
                    f"{rtl[0]}, {rtl[1]} and {rtl[2]} joined", timeout=TIMEOUT
                )
                expect(notice.locator("bdi")).to_have_text(rtl)
                lefts = notice.evaluate(CHILD_LEFTS)
                assert lefts == sorted(lefts), lefts  # each name where the text puts it
                expect(alice.locator("#members li bdi")).to_have_count(5, timeout=TIMEOUT)
                assert (
                    notice.locator("bdi").first.evaluate("(b) => getComputedStyle(b).unicodeBidi")
                    == "isolate"
                )
    # Controls: without the page's treatment the same text is reordered, so the
    # checks above measure something.
    control = alice.context.new_page()
    control.set_content(
        "<p id=spoof></p><p id=names><span></span>, <span></span> and <span></span> joined</p>"
    )
    control.evaluate("t => { document.getElementById('spoof').textContent = t; }", SPOOF)
    lefts = control.locator("#spoof").evaluate(CHAR_LEFTS)
    assert lefts == sorted(lefts, reverse=True), lefts
    control.evaluate(
        "names => document.querySelectorAll('#names span').forEach((s, i) => { s.textContent = names[i]; })",
        rtl,
    )
    lefts = control.locator("#names").evaluate(CHILD_LEFTS)
    assert lefts[0] > lefts[1], lefts


def _churn_server() -> Any:
    """A server with rate limits off, so a test client can churn as fast as it likes,
    and no presence grace: a leave then settles at once (its wait is the smaller of
    2 s and the grace), so every leave/join reaches the page instead of being hidden
    by the server.

    Close the test's page before it stops, or the page's reconnects log errors.
    """
    return run_server("--presence-grace", "0", "--rate", "0")


def count_presence_frames(page: Page) -> list[int]:
    """A one-item list counting the presence frames the page receives from now on."""
    count = [0]

    def on_frame(payload: str | bytes) -> None:
        if json.loads(payload).get("type") == "presence":
            count[0] += 1

    page.on("websocket", lambda ws: ws.on("framereceived", on_frame))
    return count


def test_page_merges_presence_churn_and_stays_responsive(open_page: OpenPage) -> None:
    """A raw client leaves and joins 500 times: the page merges the notices into a few
    lines (under the cap), keeps the members right and still chats (#18)."""
    with _churn_server() as srv:
        page = open_page()
        received = count_presence_frames(page)
        page.goto(srv.base_url + "/")
        join(page, "alice")
        notices = page.locator("#messages .sys.presence")
        with raw_chat(srv.port) as carol:
            carol.join("carol")
            expect(notices.last).to_have_text("carol joined", timeout=TIMEOUT)
            carol.say("hi")  # a line between: the churn gets a notice line of its own
            expect(page.locator("#messages .msg-text").last).to_have_text("hi", timeout=TIMEOUT)
            for _ in range(500):
                carol.leave()
                carol.join("carol")
            members(page).to_have_text(["alice", "carol"], timeout=TIMEOUT)
            # One line unless the loop outlasted the page's merge window.
            expect(notices.last).to_have_text(
                re.compile(r"^carol (left and joined again|joined)$"), timeout=TIMEOUT
            )
            # The page did get the churn (the server settled no leave away).
            assert received[0] >= 900, received
            assert 2 <= notices.count() <= min(PRESENCE_LINES_MAX, 4)
            say(page, "still here")
            expect(page.locator("#messages .msg.mine:not(.pending) .msg-text")).to_have_text(
                ["still here"], timeout=TIMEOUT
            )
            carol.ws.send(json.dumps({"type": "typing", "room": "lobby"}))
            expect(page.locator("#typing")).to_have_text("carol is typing…", timeout=TIMEOUT)
        expect(page.locator("#status")).to_have_text("connected")
        expect(page.locator("#messages .sys", has_text="Connection lost")).to_have_count(0)
        page.context.close()  # before its server stops: no reconnect noise


def test_page_caps_presence_lines_and_keeps_every_message(open_page: OpenPage) -> None:
    """A join, then a message, over and over: the oldest presence lines are dropped
    beyond the cap, and no message ever is (#18)."""
    loops = PRESENCE_LINES_MAX + 10
    with _churn_server() as srv, ExitStack() as joiners:
        page = open_page()
        page.goto(srv.base_url + "/")
        join(page, "alice")
        notices = page.locator("#messages .sys.presence")
        with raw_chat(srv.port) as carol:
            carol.join("carol")
            expect(notices.last).to_have_text("carol joined", timeout=TIMEOUT)
            for i in range(loops):
                # A new name each time (staying joined): no server could merge these.
                joiners.enter_context(raw_chat(srv.port)).join(f"u{i}")
                carol.say(f"m{i}")  # ends the notice line: the next one starts another
            expect(page.locator("#messages .msg .msg-text")).to_have_text(
                [f"m{i}" for i in range(loops)], timeout=TIMEOUT
            )
            expect(notices).to_have_count(PRESENCE_LINES_MAX, timeout=TIMEOUT)
            # "carol joined" and the oldest lines went first.
            expect(notices).to_have_text(
                [f"u{i} joined" for i in range(loops - PRESENCE_LINES_MAX, loops)]
            )
            first_kept = page.locator("#messages > *").first
            expect(first_kept).not_to_have_class(re.compile(r"\bpresence\b"))
            page.context.close()  # before anyone leaves or the server stops
