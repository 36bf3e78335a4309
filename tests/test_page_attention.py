"""Attention in the page (#15): the title counts unread messages, and desktop
notifications come for a mention or a whisper while the tab is hidden, only with
the browser's permission (allowed with Playwright's permissions; headless Chromium
denies by default) and only while the person has them on.

The tab is "hidden" by overriding `document.hidden`/`visibilityState` and firing
`visibilitychange`; notifications are recorded by a `Notification` subclass that
the test installs before the page's scripts run.
"""

from __future__ import annotations

import contextlib
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
    raw_chat,
)

if TYPE_CHECKING:
    from playwright.sync_api import Page

with contextlib.suppress(ImportError):
    from playwright.sync_api import expect

pytestmark = pytest.mark.browser

INSTRUMENT = """
(() => {
  let hidden = false;
  Object.defineProperty(document, 'hidden', { configurable: true, get: () => hidden });
  Object.defineProperty(document, 'visibilityState', {
    configurable: true, get: () => (hidden ? 'hidden' : 'visible'),
  });
  window.__setHidden = (value) => {
    hidden = value;
    document.dispatchEvent(new Event('visibilitychange'));
  };
  window.__notes = [];
  const Real = window.Notification;
  if (!Real) return;
  class Recording extends Real {
    constructor(title, options) {
      super(title, options);
      window.__notes.push({ title, body: options && options.body });
    }
  }
  Object.defineProperty(Recording, 'permission', { get: () => Real.permission });
  Recording.requestPermission = (...args) => Real.requestPermission(...args);
  window.Notification = Recording;
})();
"""


@pytest.fixture
def server() -> Iterator[ServerProcess]:
    with checked_server("--presence-grace", "0.5") as srv:
        yield srv


# The browser's permission prompt, held open until the test answers it: headless
# Chromium answers every real prompt "denied" at once. The page's
# `Notification.requestPermission()` resolves, when the test calls
# `window.__answerPrompt()`, with the browser's permission as it is then (the test
# grants it through Playwright first, as a person clicking "Allow" would).
PROMPT = """
(() => {
  if (!window.Notification) return;
  window.__prompts = 0;
  window.Notification.requestPermission = () => new Promise((resolve) => {
    window.__prompts += 1;
    window.__answerPrompt = () => resolve(window.Notification.permission);
  });
})();
"""


def instrumented(open_at: OpenAt, url: str, *scripts: str, **options: Any) -> Page:  # noqa: F811
    page = open_at(url, **options)
    for script in (INSTRUMENT, *scripts):
        page.add_init_script(script)
    page.reload()
    return page


def notes(page: Page) -> list[dict[str, str]]:
    result: list[dict[str, str]] = page.evaluate("window.__notes")
    return result


def hide(page: Page, hidden: bool = True) -> None:
    page.evaluate("h => window.__setHidden(h)", hidden)


def whisper(chat: Any, to: str, text: str) -> None:
    chat.request({"type": "whisper", "to": to, "msg": text}, "ack")


def test_page_notifies_mentions_and_whispers_when_hidden_and_allowed(
    server: ServerProcess,
    open_at: OpenAt,  # noqa: F811 (the imported fixture)
) -> None:
    """Allowed: while the tab is hidden, a mention and a whisper each give one
    notification (a plain message none); the title counts all three. Visible again,
    nothing notifies and the count clears. Turned off on the page, nothing notifies."""
    page = instrumented(open_at, server.base_url + "/", permissions=["notifications"])
    join(page, "alice")
    toggle = page.locator("#notify")
    expect(toggle).to_have_text("Notifications: on")
    expect(toggle).to_have_attribute("aria-pressed", "true")
    with raw_chat(server.port) as bob:
        bob.join("bob")
        hide(page)
        bob.say("just chatting")
        bob.say("hey Alice, look")
        whisper(bob, "alice", "psst")
        expect(page).to_have_title("(3) #lobby · triochat", timeout=TIMEOUT)
        page.wait_for_function("() => window.__notes.length >= 2", timeout=TIMEOUT)
        assert notes(page) == [
            {"title": "bob in #lobby", "body": "hey Alice, look"},
            {"title": "Whisper from bob", "body": "psst"},
        ]
        hide(page, False)
        expect(page).to_have_title("#lobby · triochat")
        bob.say("alice, you there?")
        expect(page.locator("#messages .msg-text").last).to_have_text(
            "alice, you there?", timeout=TIMEOUT
        )
        assert len(notes(page)) == 2
        # Turned off (by keyboard): no more notifications, though the title still counts.
        toggle.focus()
        page.keyboard.press("Enter")
        expect(toggle).to_have_attribute("aria-pressed", "false")
        expect(toggle).to_have_text("Notifications: off")
        hide(page)
        bob.say("alice!")
        whisper(bob, "alice", "again")
        expect(page).to_have_title("(2) #lobby · triochat", timeout=TIMEOUT)
        assert len(notes(page)) == 2


def test_page_never_notifies_when_notifications_are_denied(
    server: ServerProcess,
    open_at: OpenAt,  # noqa: F811 (the imported fixture)
) -> None:
    """Denied: the switch asks the browser, which refuses (headless Chromium refuses
    every request); the page then says they are blocked and disables its switch, and a
    mention or a whisper in a hidden tab only counts in the title."""
    page = instrumented(open_at, server.base_url + "/")
    join(page, "alice")
    toggle = page.locator("#notify")
    if page.evaluate("Notification.permission") == "default":
        expect(toggle).to_have_text("Notifications: off")
        expect(toggle).to_have_attribute("aria-pressed", "false")
        toggle.click()  # asks for permission
    page.wait_for_function("() => Notification.permission === 'denied'", timeout=TIMEOUT)
    expect(toggle).to_be_disabled()
    expect(toggle).to_have_attribute("aria-pressed", "false")
    expect(page.locator("#notify-note")).to_have_text(
        "Notifications are blocked in this browser\u2019s site settings."
    )
    with raw_chat(server.port) as bob:
        bob.join("bob")
        hide(page)
        bob.say("hey alice")
        whisper(bob, "alice", "psst")
        expect(page).to_have_title("(2) #lobby · triochat", timeout=TIMEOUT)
        page.wait_for_timeout(300)  # a notification would have been made by now
        assert notes(page) == []
        hide(page, False)
        expect(page).to_have_title("#lobby · triochat")


def test_page_asks_for_permission_and_notifies_once_allowed(
    server: ServerProcess,
    open_at: OpenAt,  # noqa: F811 (the imported fixture)
) -> None:
    """Not yet asked (permission "default"): the switch is off and nothing notifies.
    Pressing it asks the browser once; the person allows; the switch turns on, and a
    mention in another room while the tab is hidden notifies, as does a whisper."""
    page = instrumented(open_at, server.base_url + "/", PROMPT)
    assert page.evaluate("Notification.permission") == "default"
    join(page, "alice")
    page.fill("#new-room", "dev")
    page.press("#new-room", "Enter")
    expect(page.locator("#room-title")).to_have_text("#dev", timeout=TIMEOUT)
    page.click("#rooms button[data-room='lobby']")
    expect(page.locator("#room-title")).to_have_text("#lobby")
    toggle = page.locator("#notify")
    expect(toggle).to_have_text("Notifications: off")
    expect(toggle).to_have_attribute("aria-pressed", "false")
    with raw_chat(server.port) as bob:
        bob.join("bob")
        bob.join("bob", "dev")
        hide(page)
        bob.say("alice, before you allowed them", "dev")
        expect(page).to_have_title("(1) #lobby · triochat", timeout=TIMEOUT)
        hide(page, False)
        assert notes(page) == []

        toggle.click()
        page.wait_for_function("() => window.__prompts === 1", timeout=TIMEOUT)
        expect(toggle).to_have_text("Notifications: off")  # until the person answers
        page.context.grant_permissions(["notifications"], origin=server.base_url)
        page.evaluate("() => window.__answerPrompt()")
        expect(toggle).to_have_text("Notifications: on", timeout=TIMEOUT)
        expect(toggle).to_have_attribute("aria-pressed", "true")
        assert page.evaluate("Notification.permission") == "granted"

        hide(page)
        bob.say("alice, can you look at the dev build?", "dev")
        whisper(bob, "alice", "psst")
        page.wait_for_function("() => window.__notes.length >= 2", timeout=TIMEOUT)
        assert notes(page) == [
            {"title": "bob in #dev", "body": "alice, can you look at the dev build?"},
            {"title": "Whisper from bob", "body": "psst"},
        ]
        assert page.evaluate("window.__prompts") == 1
