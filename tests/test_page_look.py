"""How the page looks and how accessible it is (#15): the phone layout (composer at the
bottom, rooms and members behind toggles), the dark theme that follows
`prefers-color-scheme`, screenshots for the README (docs/screenshot-*.png), an
automated accessibility check (axe-core, vendored under tests/vendor/, evaluated in
the page) with no serious or critical violation in the join form, the chat and the
offline state, visible focus on every control, the keyboard alone, and polite
announcements that do not repeat (no countdown read out every second).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .server_process import ServerProcess, run_server
from .tcpproxy import TcpProxy
from .test_browser import (  # noqa: F401 (fixtures)
    DESKTOP,
    TIMEOUT,
    OpenAt,
    browser,
    join,
    open_at,
    raw_chat,
    say,
)
from .test_browser_resilience import OFFLINE, OpenPage, open_page  # noqa: F401 (fixture)

if TYPE_CHECKING:
    from playwright.sync_api import Page, ViewportSize

with contextlib.suppress(ImportError):
    from playwright.sync_api import expect

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parent.parent
AXE_JS = REPO / "tests" / "vendor" / "axe-core" / "axe.min.js"
# The README's screenshots are rewritten only when asked for, so a test run
# leaves the checkout as it was: TRIOCHAT_UPDATE_SCREENSHOTS=1 pytest tests/test_page_look.py
SCREENSHOTS = (
    REPO / "docs"
    if os.environ.get("TRIOCHAT_UPDATE_SCREENSHOTS") == "1"
    else Path(tempfile.gettempdir()) / "triochat-screenshots"
)
SCREENSHOTS.mkdir(exist_ok=True)
WIDE: ViewportSize = {"width": 1280, "height": 800}
PHONE: ViewportSize = {"width": 390, "height": 844}

AXE_RUN = """async () => {
  const result = await axe.run(document, { resultTypes: ['violations'] });
  return result.violations.map((v) => ({
    id: v.id, impact: v.impact, help: v.help,
    nodes: v.nodes.map((n) => `${n.target.join(' ')}: ${n.failureSummary}`),
  }));
}"""


def axe_problems(page: Page) -> list[dict[str, Any]]:
    """The serious and critical axe-core violations on the page as it is now.

    axe is evaluated through Playwright (not injected as a <script>), so the page's
    Content-Security-Policy stays as strict as it is."""
    if not page.evaluate("() => typeof window.axe === 'object'"):
        page.evaluate(AXE_JS.read_text())
    violations: list[dict[str, Any]] = page.evaluate(AXE_RUN)
    return [v for v in violations if v["impact"] in ("serious", "critical")]


def assert_accessible(page: Page, where: str) -> None:
    problems = axe_problems(page)
    assert not problems, f"axe-core, {where}:\n{json.dumps(problems, indent=1)}"


@pytest.fixture
def server() -> Iterator[ServerProcess]:
    with run_server("--presence-grace", "0.5") as srv:
        yield srv


@contextlib.contextmanager
def scene(
    open_at: OpenAt,  # noqa: F811 (not the fixture: its value)
    server: ServerProcess,
    **options: Any,
) -> Iterator[Page]:
    """alice's page in a small conversation: two rooms, grouped messages, a link, a
    whisper, an unread mention in the other room and someone typing."""
    page = open_at(server.base_url + "/", **options)
    with raw_chat(server.port) as bob, raw_chat(server.port) as carol:
        for chat, name in ((bob, "bob"), (carol, "carol")):
            chat.join(name)
            chat.join(name, "dev")
        join(page, "alice")
        phone = page.locator("#rooms-toggle").is_visible()
        if phone:
            page.click("#rooms-toggle")
        page.fill("#new-room", "dev")
        page.press("#new-room", "Enter")
        expect(page.locator("#room-title")).to_have_text("#dev", timeout=TIMEOUT)
        if phone:
            page.click("#rooms-toggle")
        page.click("#rooms button[data-room='lobby']")
        bob.say("Morning! The deploy went out.")
        bob.say("Release notes: https://example.com/releases/2.4")
        carol.say("Nice. The rooms sidebar is a big help.")
        say(page, "Thanks both! And a reload no longer shows the login screen.")
        bob.request({"type": "whisper", "to": "alice", "msg": "lunch at noon?"}, "ack")
        carol.say("alice, could you review the new docs?", "dev")
        bob.ws.send(json.dumps({"type": "typing", "room": "lobby"}))
        expect(page.locator("#typing")).to_have_text("bob is typing…", timeout=TIMEOUT)
        expect(page.locator("#rooms button[data-room='dev'] .unread")).to_have_text("1")
        yield page


def test_page_desktop_screenshot_and_accessible_chat(
    server: ServerProcess,
    open_at: OpenAt,  # noqa: F811 (the imported fixture)
) -> None:
    """The chat at 1280x800: no serious or critical axe violation; the README's
    desktop screenshot."""
    with scene(open_at, server, viewport=WIDE) as page:
        assert_accessible(page, "the chat")
        page.mouse.move(0, 0)
        page.screenshot(path=str(SCREENSHOTS / "screenshot-desktop.png"))


def test_page_join_form_is_accessible(
    server: ServerProcess,
    open_at: OpenAt,  # noqa: F811 (the imported fixture)
) -> None:
    """The join form, empty and with an error shown, has no serious or critical
    axe violation."""
    page = open_at(server.base_url + "/")
    expect(page.locator("#name")).to_be_focused(timeout=TIMEOUT)
    assert_accessible(page, "the join form")
    page.fill("#room", "Not A Room")
    page.click("#join")
    expect(page.locator("#join-error")).to_be_visible()
    assert_accessible(page, "the join form with an error")


def test_page_offline_state_is_accessible_and_announced_once(
    open_page: OpenPage,  # noqa: F811 (the imported fixture)
) -> None:
    """Offline: the status line counts down (plain words, no close code) but is not a
    live region; the announcement is made once and stays the same while the countdown
    runs; "Retry now" is there; no serious or critical axe violation."""
    with run_server("--presence-grace", "1") as srv, TcpProxy(srv.port) as proxy:
        page = open_page(proxy.url + "/")
        join(page, "alice")
        say(page, "hello")
        proxy.refuse()
        proxy.cut()
        status = page.locator("#status")
        expect(status).to_have_text(OFFLINE, timeout=TIMEOUT)
        expect(page.locator("#retry")).to_be_visible()
        expect(page.locator("#messages .sys").last).to_have_text(
            "Connection lost: the network connection was lost. Reconnecting…"
        )
        # Not live: no role=status/alert/log and no aria-live on it or around it.
        live = status.evaluate(
            """el => {
              for (let n = el; n; n = n.parentElement) {
                if (n.getAttribute('aria-live') || ['status', 'alert', 'log'].includes(n.getAttribute('role'))) return true;
              }
              return false;
            }"""
        )
        assert live is False
        announcer = page.locator("#announcer")
        expect(announcer).to_have_attribute("role", "status")
        said = announcer.text_content()
        assert said
        assert "retrying in" not in said
        assert not re.search(r"\d", said)
        shown = set()
        for _ in range(12):  # 3 s: the countdown moves, the announcement does not
            shown.add(status.text_content())
            assert announcer.text_content() == said
            page.wait_for_timeout(250)
        assert len(shown) >= 2, shown
        say(page, "typed offline")
        assert_accessible(page, "the offline state")
        page.context.close()  # before the proxy and the server stop


def test_page_phone_layout(
    server: ServerProcess,
    open_at: OpenAt,  # noqa: F811 (the imported fixture)
) -> None:
    """At 390x844: the messages fill the screen with the composer at the bottom; rooms
    and members open as drawers from the top bar (and close with Escape or a choice);
    nothing scrolls sideways; accessible; the README's phone screenshot."""
    with scene(open_at, server, viewport=PHONE, is_mobile=True, has_touch=True) as page:
        composer = page.locator("#input").bounding_box()
        log = page.locator("#log").bounding_box()
        assert composer
        assert log
        assert composer["y"] + composer["height"] >= PHONE["height"] - 70, composer
        assert log["height"] > PHONE["height"] * 0.5, log
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        for hidden in ("#rooms", "#members"):
            expect(page.locator(hidden)).to_be_hidden()
        expect(page.locator("#rooms-toggle-badge")).to_have_text("1")
        page.mouse.move(0, 0)
        page.screenshot(path=str(SCREENSHOTS / "screenshot-phone.png"))
        assert_accessible(page, "the chat on a phone")

        page.click("#rooms-toggle")
        expect(page.locator("#rooms")).to_be_in_viewport()
        expect(page.locator("#rooms-toggle")).to_have_attribute("aria-expanded", "true")
        assert_accessible(page, "the rooms drawer")
        page.click("#rooms button[data-room='dev']")
        expect(page.locator("#rooms")).to_be_hidden()
        expect(page.locator("#room-title")).to_have_text("#dev")
        expect(page.locator("#messages .msg-text")).to_have_text(
            ["alice, could you review the new docs?"]
        )
        page.click("#members-toggle")
        expect(page.locator("#members li")).to_have_text(["alice", "bob", "carol"])
        expect(page.locator("#members")).to_be_in_viewport()
        page.keyboard.press("Escape")
        expect(page.locator("#members")).to_be_hidden()
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]


def luminance(css_color: str) -> float:
    """Relative luminance (WCAG) of an ``rgb(...)`` colour."""
    r, g, b = (int(v) / 255 for v in re.findall(r"\d+", css_color)[:3])

    def lin(c: float) -> float:
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    return 0.2126 * lin(r) + 0.7152 * lin(g) + 0.0722 * lin(b)


def colours(page: Page, selector: str) -> tuple[float, float]:
    """Luminance of the text colour and of the background colour of ``selector``."""
    fg, bg = page.locator(selector).first.evaluate(
        "el => [getComputedStyle(el).color, getComputedStyle(el).backgroundColor]"
    )
    return luminance(fg), luminance(bg)


def test_page_dark_mode_follows_the_system(
    server: ServerProcess,
    open_at: OpenAt,  # noqa: F811 (the imported fixture)
) -> None:
    """With prefers-color-scheme: dark the page is dark (light text on dark panels, the
    form controls too), and still passes axe (contrast included); the README's dark
    screenshot. In light mode the same parts are light."""
    light = open_at(server.base_url + "/", viewport=WIDE, color_scheme="light")
    for selector in ("html", "#join-form", "#name"):
        text, back = colours(light, selector)
        assert back > 0.8 > 0.1 > text, (selector, back, text)
    with scene(open_at, server, viewport=WIDE, color_scheme="dark") as page:
        for selector in ("html", ".chat-view", ".rooms-pane", "#input"):
            text, back = colours(page, selector)
            assert back < 0.05, (selector, back)
            assert text > 0.6, (selector, text)
        assert page.evaluate("matchMedia('(prefers-color-scheme: dark)').matches")
        assert_accessible(page, "the chat in dark mode")
        page.mouse.move(0, 0)
        page.screenshot(path=str(SCREENSHOTS / "screenshot-dark.png"))
    page.click("#leave")
    page.click("#leave")
    expect(page.locator("#join")).to_be_visible(timeout=TIMEOUT)
    assert_accessible(page, "the join form in dark mode")


FOCUS_RING = """el => {
  const s = getComputedStyle(el);
  return { style: s.outlineStyle, width: parseFloat(s.outlineWidth), offset: parseFloat(s.outlineOffset) };
}"""


def test_page_keyboard_only_with_visible_focus(
    server: ServerProcess,
    open_at: OpenAt,  # noqa: F811 (the imported fixture)
) -> None:
    """Every control is reached with Tab and shows a focus ring (the message log's is
    drawn inside it, so its scrolling box cannot clip it); a room is joined, chosen,
    written in and left with the keyboard alone."""
    page = open_at(server.base_url + "/")
    page.keyboard.type("alice")
    page.keyboard.press("Enter")  # Enter in the name field submits the join form
    expect(page.locator("#input")).to_be_focused(timeout=TIMEOUT)
    page.keyboard.type("hello https://example.com/")
    page.keyboard.press("Enter")
    expect(page.locator("#messages .msg.mine:not(.pending)")).to_have_count(1, timeout=TIMEOUT)

    reached: dict[str, dict[str, float | str]] = {}
    for _ in range(40):
        page.keyboard.press("Tab")
        key = page.evaluate(
            """() => {
              const el = document.activeElement;
              return el.id || (el.dataset.room ? `room:${el.dataset.room}` : el.tagName.toLowerCase());
            }"""
        )
        reached[key] = page.evaluate(f"() => ({FOCUS_RING})(document.activeElement)")
    for control in (
        "room:lobby",
        "new-room",
        "add-room",
        "notify",
        "log",
        "input",
        "send",
        "leave",
        "a",
    ):
        assert control in reached, (control, sorted(reached))
    for control, ring in reached.items():
        if control == "body":
            continue
        assert ring["style"] != "none", (control, ring)
        assert ring["width"] >= 2, (control, ring)
    assert reached["log"]["offset"] < 0, reached["log"]  # inside the scrolling box

    # Join a second room, go back to the first, and leave the second, by keyboard only.
    page.locator("#new-room").focus()
    page.keyboard.type("dev")
    page.keyboard.press("Enter")
    expect(page.locator("#room-title")).to_have_text("#dev", timeout=TIMEOUT)
    expect(page.locator("#input")).to_be_focused()
    page.keyboard.type("in dev")
    page.keyboard.press("Enter")
    expect(page.locator("#messages .msg.mine:not(.pending) .msg-text")).to_have_text(
        ["in dev"], timeout=TIMEOUT
    )
    page.locator("#rooms button[data-room='lobby']").focus()
    page.keyboard.press("Enter")
    expect(page.locator("#room-title")).to_have_text("#lobby")
    page.locator("#rooms button[data-room='dev']").focus()
    page.keyboard.press("Space")
    page.locator("#leave").focus()
    page.keyboard.press("Enter")
    expect(page.locator("#room-title")).to_have_text("#lobby", timeout=TIMEOUT)
    expect(page.locator("#rooms .room-name")).to_have_text(["#lobby"])
    expect(page.locator("#input")).to_be_focused()


def test_page_messages_are_list_items_named_in_full(
    server: ServerProcess,
    open_at: OpenAt,  # noqa: F811 (the imported fixture)
) -> None:
    """Each message is one list item whose accessible name is "sender, HH:MM: text",
    also when grouped under the name line of the one before; a new message from
    someone else is announced politely, once."""
    page = open_at(server.base_url + "/")
    join(page, "alice")
    with raw_chat(server.port) as bob:
        bob.join("bob")
        bob.say("first")
        bob.say("second")
        items = page.locator("#messages > li.msg")
        expect(items).to_have_count(2, timeout=TIMEOUT)
        expect(items.nth(1)).to_have_class(re.compile(r"\bgrouped\b"))
        time = items.nth(1).locator(".msg-time").text_content()
        assert time
        assert re.fullmatch(r"\d\d:\d\d", time)
        expect(
            page.get_by_role("listitem", name=f"bob, {time}: second", exact=True)
        ).to_have_count(1)
        expect(page.locator("#announcer")).to_have_text("bob: second")
        say(page, "mine")
        expect(
            page.get_by_role("listitem", name=re.compile(r"^alice, \d\d:\d\d: mine$"))
        ).to_have_count(1, timeout=TIMEOUT)
        expect(page.locator("#announcer")).to_have_text("bob: second")  # one's own is not read out
