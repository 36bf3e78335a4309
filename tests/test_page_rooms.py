"""The page's rooms (#15): several at once with unread counts and mentions, the URL
naming the current room, and a reload or a new tab that resumes every room with
the stored token and `since`, with no join form and no leave/join for anyone else.

Headless Chromium (the `browser` fixture of test_browser.py, with its skip/fail
policy) against real server processes; a Python WebSocket client (`observer`)
is the other user and sees what everyone else would see.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

from .server_process import ServerProcess, run_server
from .test_browser import (  # noqa: F401 (fixtures)
    TIMEOUT,
    OpenAt,
    browser,
    join,
    open_at,
    raw_chat,
    say,
)
from .test_browser_resilience import Observer, observer, record_sent

if TYPE_CHECKING:
    from playwright.sync_api import Page

# Without Playwright the `browser` fixture skips (or fails) before `expect` is needed.
with contextlib.suppress(ImportError):
    from playwright.sync_api import expect

pytestmark = pytest.mark.browser

GRACE = 1.0  # --presence-grace, seconds

# Records whether the join form is ever shown, from the first byte of the page on.
WATCH_JOIN_FORM = """
window.__joinFormShown = false;
new MutationObserver(() => {
  const view = document.getElementById('join-view');
  if (view && !view.hidden) window.__joinFormShown = true;
}).observe(document, { subtree: true, childList: true, attributes: true, attributeFilter: ['hidden'] });
"""


@pytest.fixture
def server() -> Iterator[ServerProcess]:
    """A fresh server per test (presence grace 1 s); requested before `open_at`, so the
    pages close before it stops (a page left open would log its failed reconnects)."""
    with run_server("--presence-grace", str(GRACE)) as srv:
        yield srv


def enter_room(obs: Observer, room: str) -> None:
    """The observer joins one more room."""
    obs.send({"type": "join", "room": room, "ref": f"join-{room}"})
    obs.wait_for(lambda f: f["type"] == "joined" and f["room"] == room)


def say_in(obs: Observer, room: str, text: str) -> str:
    """The observer says ``text`` in ``room``; the message id."""
    ref = f"say-{room}-{len(obs.frames)}"
    obs.send({"type": "say", "room": room, "msg": text, "ref": ref})
    return str(obs.wait_for(lambda f: f["type"] == "ack" and f["ref"] == ref)["id"])


def add_room(page: Page, room: str) -> None:
    """Join ``room`` from the sidebar (by keyboard) and wait until it is the room shown."""
    page.fill("#new-room", room)
    page.press("#new-room", "Enter")
    expect(page.locator("#room-title")).to_have_text(f"#{room}", timeout=TIMEOUT)
    expect(page.locator("#input")).to_be_enabled(timeout=TIMEOUT)


def texts(page: Page) -> Any:
    return expect(page.locator("#messages .msg .msg-text"))


def room_button(page: Page, room: str) -> Any:
    return page.locator(f"#rooms button[data-room='{room}']")


def presence_since(obs: Observer, mark: int, name: str) -> list[tuple[str, str]]:
    """(room, event) of every presence frame about ``name`` from ``obs.frames[mark]`` on."""
    return [
        (f["room"], f["event"])
        for f in obs.frames[mark:]
        if f["type"] == "presence" and f["name"] == name
    ]


def stored(page: Page) -> Any:
    return page.evaluate("JSON.parse(sessionStorage.getItem('triochat'))")


def test_page_reload_rejoins_every_room_without_a_form_or_a_flicker(
    server: ServerProcess,
    open_at: OpenAt,  # noqa: F811 (the imported fixture)
) -> None:
    """alice is in two rooms and reloads: no join form, both rooms rejoined with the
    stored token (rotate) and each room's last id, the current room kept, what was said
    while reloading shown once; bob, in both rooms, sees no leave/join at all."""
    with observer(server.port, "bob") as bob:
        enter_room(bob, "dev")
        page = open_at(server.base_url + "/")
        join(page, "alice")
        last = {"lobby": say_in(bob, "lobby", "hello lobby")}
        add_room(page, "dev")
        last["dev"] = say_in(bob, "dev", "hello dev")
        texts(page).to_have_text(["hello dev"], timeout=TIMEOUT)
        expect(page).to_have_url(re.compile(r"\?room=dev$"))
        token = stored(page)["token"]
        page.add_init_script(WATCH_JOIN_FORM)
        sent = record_sent(page)
        mark = len(bob.frames)

        page.reload()
        expect(page.locator("#status")).to_have_text("connected", timeout=TIMEOUT)
        expect(page.locator("#input")).to_be_enabled(timeout=TIMEOUT)
        assert page.evaluate("window.__joinFormShown") is False
        expect(page.locator("#room-title")).to_have_text("#dev")
        expect(page.locator("#rooms .room-name")).to_have_text(["#lobby", "#dev"])
        joins = [f for f in sent if f["type"] == "join"]
        assert sorted(f["room"] for f in joins) == ["dev", "lobby"], joins
        for frame in joins:
            assert frame["name"] == "alice"
            assert frame["token"] == token
            assert frame["rotate"] is True
            assert frame["since"] == last[frame["room"]]
        # The room's past comes back from history; nothing twice.
        texts(page).to_have_text(["hello dev"], timeout=TIMEOUT)
        assert stored(page)["token"] not in (None, token)  # rotated, and kept

        say_in(bob, "dev", "after the reload")
        texts(page).to_have_text(["hello dev", "after the reload"], timeout=TIMEOUT)
        say(page, "back again")
        bob.wait_for(lambda f: f["type"] == "message" and f["msg"] == "back again")
        page.click("#rooms button[data-room='lobby']")
        texts(page).to_have_text(["hello lobby"], timeout=TIMEOUT)
        bob.listen(GRACE + 0.5)  # past the grace period of the reloaded page's connection
        assert presence_since(bob, mark, "alice") == []
        assert bob.closed is None


def test_page_new_tab_resumes_and_the_old_tab_steps_aside(
    server: ServerProcess,
    open_at: OpenAt,  # noqa: F811 (the imported fixture)
) -> None:
    """A second tab of the same browser resumes alice's rooms (no join form); the first
    says "open in another tab" and does not fight back; "Use here" takes the chat back
    with the newer tab's token. bob never sees alice leave or join."""
    with observer(server.port, "bob") as bob:
        first = open_at(server.base_url + "/")
        join(first, "alice")
        add_room(first, "dev")
        bob.wait_for(lambda f: f["type"] == "presence" and f["name"] == "alice")
        mark = len(bob.frames)  # from here on, nothing about alice may come
        second = open_at(server.base_url + "/", context=first.context)
        expect(second.locator("#status")).to_have_text("connected", timeout=TIMEOUT)
        expect(second.locator("#rooms .room-name")).to_have_text(["#lobby", "#dev"])
        expect(second.locator("#join-view")).to_be_hidden()
        expect(first.locator("#status")).to_have_text("open in another tab", timeout=TIMEOUT)
        expect(first.locator("#input")).to_be_disabled()
        second.click("#rooms button[data-room='lobby']")
        say(second, "from the new tab")
        bob.wait_for(lambda f: f["type"] == "message" and f["msg"] == "from the new tab")

        first.click("#retry")  # "Use here"
        expect(first.locator("#status")).to_have_text("connected", timeout=TIMEOUT)
        first.click("#rooms button[data-room='lobby']")
        expect(second.locator("#status")).to_have_text("open in another tab", timeout=TIMEOUT)
        expect(first.locator("#input")).to_be_enabled()
        say(first, "back in the first tab")
        bob.wait_for(lambda f: f["type"] == "message" and f["msg"] == "back in the first tab")
        bob.listen(GRACE + 0.5)
        assert presence_since(bob, mark, "alice") == []


def test_page_two_rooms_unread_counts_mentions_and_title(
    server: ServerProcess,
    open_at: OpenAt,  # noqa: F811 (the imported fixture)
) -> None:
    """Messages in the room not shown count as unread in the sidebar and the title, a
    message naming alice marks the room; opening it clears both. Leaving one room keeps
    the other: bob sees alice leave dev only."""
    with observer(server.port, "bob") as bob:
        enter_room(bob, "dev")
        page = open_at(server.base_url + "/")
        join(page, "alice")
        add_room(page, "dev")
        expect(page).to_have_title("#dev · triochat")
        say_in(bob, "lobby", "one")
        say_in(bob, "lobby", "two")
        lobby = room_button(page, "lobby")
        expect(lobby.locator(".unread")).to_have_text("2", timeout=TIMEOUT)
        expect(lobby.locator(".mention")).to_have_count(0)
        say_in(bob, "lobby", "are you there, Alice?")
        expect(lobby.locator(".unread")).to_have_text("3", timeout=TIMEOUT)
        expect(lobby.locator(".mention")).to_be_visible()
        expect(page).to_have_title("(3) #dev · triochat")
        expect(page.get_by_role("button", name="#lobby, 3 unread, mentions you")).to_be_visible()
        expect(page.locator("#rooms-toggle-badge")).to_have_text("3")
        # A message in the room shown is not unread.
        say_in(bob, "dev", "in dev")
        texts(page).to_have_text(["in dev"], timeout=TIMEOUT)
        expect(room_button(page, "dev").locator(".unread")).to_have_count(0)

        # Opening the room by keyboard clears its count and shows what was missed.
        lobby.focus()
        page.keyboard.press("Enter")
        expect(page.locator("#room-title")).to_have_text("#lobby")
        expect(lobby).to_have_attribute("aria-current", "page")
        texts(page).to_have_text(["one", "two", "are you there, Alice?"])
        expect(lobby.locator(".unread")).to_have_count(0)
        expect(page).to_have_title("#lobby · triochat")

        # Leave dev: lobby stays.
        page.click("#rooms button[data-room='dev']")
        page.click("#leave")
        expect(page.locator("#room-title")).to_have_text("#lobby", timeout=TIMEOUT)
        expect(page.locator("#rooms .room-name")).to_have_text(["#lobby"])
        bob.wait_for(
            lambda f: f["type"] == "presence" and f["room"] == "dev" and f["event"] == "leave"
        )
        say(page, "still in the lobby")
        bob.wait_for(lambda f: f["type"] == "message" and f["msg"] == "still in the lobby")
        bob.listen(0.5)
        assert presence_since(bob, 0, "alice") == [
            ("lobby", "join"),
            ("dev", "join"),
            ("dev", "leave"),
        ]


def test_page_url_names_the_room_and_a_link_opens_it(
    server: ServerProcess,
    open_at: OpenAt,  # noqa: F811 (the imported fixture)
) -> None:
    """The URL carries the room shown (`?room=`): a link to it prefills the join form for
    a newcomer, and opens it (joining it too) for someone already chatting."""
    page = open_at(server.base_url + "/?room=dev")
    expect(page.locator("#room")).to_have_value("dev")
    join(page, "alice", "dev")
    expect(page).to_have_url(re.compile(r"/\?room=dev$"))
    add_room(page, "ops")
    expect(page).to_have_url(re.compile(r"/\?room=ops$"))
    page.click("#rooms button[data-room='dev']")
    expect(page).to_have_url(re.compile(r"/\?room=dev$"))
    # A link to a room she is not in yet: resumed, and that room joined and shown.
    page.goto(server.base_url + "/?room=design")
    expect(page.locator("#room-title")).to_have_text("#design", timeout=TIMEOUT)
    expect(page.locator("#rooms .room-name")).to_have_text(["#dev", "#ops", "#design"])
    expect(page.locator("#status")).to_have_text("connected")
    with observer(server.port, "bob", room="design") as bob:
        assert bob.joined["members"] == ["alice", "bob"]
        say(page, "found it")
        bob.wait_for(lambda f: f["type"] == "message" and f["msg"] == "found it")


def test_page_shows_the_join_form_when_the_session_cannot_be_resumed(
    server: ServerProcess,
    browser: Any,  # noqa: F811 (the imported fixture)
    open_at: OpenAt,  # noqa: F811 (the imported fixture)
) -> None:
    """alice's browser comes back after her grace period, and bob has taken the name
    meanwhile: the resume is refused, so the join form shows (name prefilled) and says
    why; a new name then works."""
    page = open_at(server.base_url + "/")
    join(page, "alice")
    saved = page.context.storage_state()  # cookies and localStorage: what a new tab sees
    page.context.close()
    with raw_chat(server.port) as other:
        # Once alice's grace period is over, "ALICE" (the same name key) is free to take.
        deadline = time.monotonic() + GRACE + 5
        while True:
            other.ws.send(json.dumps({"type": "join", "room": "lobby", "name": "ALICE"}))
            answer = json.loads(other.ws.recv(timeout=TIMEOUT / 1000))
            if answer["type"] == "joined":
                break
            assert answer.get("code") == "name_taken", answer
            assert time.monotonic() < deadline, "alice's name was never freed"
            time.sleep(0.2)
        again = open_at(server.base_url + "/", storage_state=saved)
        expect(again.locator("#join-error")).to_contain_text(
            "Could not continue as alice", timeout=TIMEOUT
        )
        expect(again.locator("#join")).to_be_visible()
        expect(again.locator("#name")).to_have_value("alice")
        expect(again.locator("#status")).to_have_text("not connected")
        join(again, "alice2")
        expect(again.locator("#members li")).to_have_text(["ALICE", "alice2"], timeout=TIMEOUT)


@pytest.fixture
def capped_server() -> Iterator[ServerProcess]:
    """A server that lets one connection be in two rooms at most (``--max-rooms 2``)."""
    with run_server("--presence-grace", str(GRACE), "--max-rooms", "2") as srv:
        yield srv


def test_page_says_when_the_rooms_limit_is_reached(
    capped_server: ServerProcess,
    open_at: OpenAt,  # noqa: F811 (the imported fixture)
) -> None:
    """The server tells its `--max-rooms` in `joined.limits.rooms` (#15). In that many
    rooms, the "join another room" control says so in plain words, and joining one more
    sends no join (the server would refuse it with bad_room); a room already joined
    still opens, and after leaving one another can be joined."""
    full = "You're in 2 rooms, the most this server allows. Leave one to join another."
    page = open_at(capped_server.base_url + "/")
    sent = record_sent(page)
    received: list[dict[str, Any]] = []
    page.on(
        "websocket",
        lambda ws: ws.on("framereceived", lambda payload: received.append(json.loads(payload))),
    )
    join(page, "alice")
    hint = page.locator("#add-room-hint")
    error = page.locator("#add-room-error")
    expect(hint).to_be_hidden()
    add_room(page, "dev")
    expect(hint).to_have_text(full)
    expect(page.locator("#new-room")).to_have_accessible_description(re.compile("2 rooms"))

    page.fill("#new-room", "ops")
    page.press("#new-room", "Enter")
    expect(error).to_have_text(full)
    expect(hint).to_be_hidden()  # said once, by the alert
    expect(page.locator("#new-room")).to_have_value("ops")  # kept for later
    expect(page.locator("#rooms .room-name")).to_have_text(["#lobby", "#dev"])
    expect(page.locator("#room-title")).to_have_text("#dev")

    # A room she is in still opens from the same control.
    page.fill("#new-room", "lobby")
    page.press("#new-room", "Enter")
    expect(page.locator("#room-title")).to_have_text("#lobby", timeout=TIMEOUT)
    expect(error).to_be_hidden()
    expect(hint).to_have_text(full)
    assert not [f for f in sent if f.get("type") == "join" and f.get("room") == "ops"]

    # Leave one: below the limit, the control joins again.
    page.click("#leave")
    expect(page.locator("#room-title")).to_have_text("#dev", timeout=TIMEOUT)
    expect(hint).to_be_hidden()
    add_room(page, "ops")
    expect(page.locator("#rooms .room-name")).to_have_text(["#dev", "#ops"])
    expect(hint).to_have_text(full)
    expect(error).to_be_hidden()
    assert [f["room"] for f in sent if f.get("type") == "join"] == ["lobby", "dev", "ops"]
    assert not [f for f in received if f.get("type") == "error"], "the server refused nothing"
