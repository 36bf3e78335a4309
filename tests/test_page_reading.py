"""Reading in the page (#15): scrollback paged with `history` back to the beginning of
a room, the "N new messages" pill, messages grouped by sender under one name line,
day separators, accessible names, and which text becomes a link (only http(s) URLs,
never markup, never a `javascript:` URL).

Messages on two days come from a server whose wall clock is shifted back for a while
(a `sitecustomize` shim: ids and history are the server's own, on its data dir).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
from collections.abc import Iterator
from pathlib import Path
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

if TYPE_CHECKING:
    from playwright.sync_api import Page

with contextlib.suppress(ImportError):
    from playwright.sync_api import expect

pytestmark = pytest.mark.browser

GROUP_SECONDS = 5 * 60  # the page groups one sender's messages this close together

# Imported by the server process (PYTHONPATH): its wall clock runs SHIFT seconds late,
# so the messages it stores carry an earlier `ts`.
CLOCK_SHIM = """
import os
import time

_shift = float(os.environ.get("TEST_CLOCK_SHIFT_S", "0"))
if _shift:
    _time_ns, _time = time.time_ns, time.time
    time.time_ns = lambda: _time_ns() - int(_shift * 1e9)
    time.time = lambda: _time() - _shift
"""


@pytest.fixture
def server() -> Iterator[ServerProcess]:
    """A server with rate limits off (tests fill rooms fast), requested before `open_at`."""
    with run_server("--rate", "0", "--presence-grace", "0.5") as srv:
        yield srv


def texts(page: Page) -> Any:
    return expect(page.locator("#messages .msg .msg-text"))


def scroll_top(page: Page) -> float:
    return float(page.locator("#log").evaluate("el => el.scrollTop"))


def test_page_scrollback_pages_through_more_than_300_messages(
    server: ServerProcess,
    open_at: OpenAt,  # noqa: F811 (the imported fixture)
) -> None:
    """350 messages: the page shows the newest, and each scroll to the top loads older
    ones (keeping what was in view in place) until "This is the beginning of #lobby";
    then all 350 are there, in order, each once."""
    sent = [f"message {n}" for n in range(350)]
    with raw_chat(server.port) as bob:
        bob.join("bob")
        for text in sent:
            bob.say(text)
    page = open_at(server.base_url + "/")
    join(page, "alice")
    rows = page.locator("#messages .msg")
    expect(rows).to_have_count(100, timeout=TIMEOUT)
    start = page.locator("#messages .sys.start")
    for _ in range(10):
        if start.count():
            break
        before = rows.count()
        first = rows.first.get_attribute("data-id")
        page.locator("#log").evaluate("el => { el.scrollTop = 0; }")
        page.wait_for_function(
            "n => document.querySelectorAll('#messages .msg').length > n", arg=before
        )
        # What was at the top stays where it was: the older messages went above it.
        assert scroll_top(page) > 0
        expect(page.locator(f"#messages .msg[data-id='{first}']")).to_be_in_viewport()
    expect(start).to_have_text("This is the beginning of #lobby.", timeout=TIMEOUT)
    texts(page).to_have_text(sent)
    expect(page.locator("#messages > *").first).to_have_class(re.compile(r"\bstart\b"))


def test_page_new_messages_pill_when_scrolled_up(
    server: ServerProcess,
    open_at: OpenAt,  # noqa: F811 (the imported fixture)
) -> None:
    """Scrolled up, new messages do not move the view; a pill counts them, and
    pressing it goes down to them. At the bottom, new messages just show."""
    with raw_chat(server.port) as bob:
        bob.join("bob")
        for n in range(80):
            bob.say(f"old {n}")
        page = open_at(server.base_url + "/")
        join(page, "alice")
        pill = page.locator("#new-pill")
        log = page.locator("#log")
        log.evaluate("el => { el.scrollTop = el.scrollHeight / 2; }")
        where = scroll_top(page)
        for n in range(3):
            bob.say(f"new {n}")
        expect(pill).to_have_text("3 new messages ↓", timeout=TIMEOUT)
        expect(pill).to_be_visible()
        assert scroll_top(page) == where
        expect(page.locator("#messages .msg-text", has_text="new 2")).not_to_be_in_viewport()
        pill.focus()
        page.keyboard.press("Enter")
        expect(pill).to_be_hidden()
        expect(page.locator("#messages .msg-text", has_text="new 2")).to_be_in_viewport()
        expect(page.locator("#input")).to_be_focused()
        bob.say("at the bottom")
        expect(page.locator("#messages .msg-text").last).to_have_text("at the bottom")
        expect(page.locator("#messages .msg-text").last).to_be_in_viewport(timeout=TIMEOUT)
        expect(pill).to_be_hidden()


def _say_with_shift(
    tmp_path: Path, data_dir: Path, shift: float, lines: list[tuple[str, str]]
) -> None:
    """Run the server on ``data_dir`` with its clock ``shift`` seconds late, and have each
    (name, text) of ``lines`` said in the lobby, in order."""
    shim = tmp_path / "shim"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text(CLOCK_SHIM)
    env = {"PYTHONPATH": str(shim), "TEST_CLOCK_SHIFT_S": str(shift)}
    with run_server("--data-dir", str(data_dir), "--rate", "0", env=env, memory=False) as srv:
        speakers: dict[str, Any] = {}
        with contextlib.ExitStack() as stack:
            for name, text in lines:
                if name not in speakers:
                    speakers[name] = stack.enter_context(raw_chat(srv.port))
                    speakers[name].join(name)
                speakers[name].say(text)


def test_page_groups_by_sender_and_separates_days(
    tmp_path: Path,
    open_at: OpenAt,  # noqa: F811 (the imported fixture)
) -> None:
    """Messages of yesterday and today: a day separator before the first of each day
    ("Yesterday", "Today"); one sender's messages within 5 minutes of each other share
    one name line, a pause, another sender or a new day starts a new one. Each message
    is one list item named "sender, HH:MM: text"."""
    data = tmp_path / "data"
    _say_with_shift(tmp_path, data, 86400, [("bob", "y1"), ("bob", "y2"), ("carol", "y3")])
    _say_with_shift(tmp_path, data, 600, [("bob", "t1")])
    now = [("bob", "t2"), ("bob", "t3"), ("carol", "t4"), ("bob", "t5")]
    _say_with_shift(tmp_path, data, 0, now)
    with run_server("--data-dir", str(data), "--rate", "0", memory=False) as srv:
        page = open_at(srv.base_url + "/", timezone_id="UTC", locale="en-GB")
        join(page, "alice")
        texts(page).to_have_text(["y1", "y2", "y3", "t1", "t2", "t3", "t4", "t5"], timeout=TIMEOUT)
        rows: list[dict[str, Any]] = page.eval_on_selector_all(
            "#messages > li",
            """items => items.map(li => ({
                day: li.classList.contains('day') ? li.textContent : null,
                msg: li.classList.contains('msg'),
                grouped: li.classList.contains('grouped'),
                ts: Number(li.dataset.ts || 0),
                name: li.querySelector('.msg-name')?.textContent,
                text: li.querySelector('.msg-text')?.textContent,
                label: li.getAttribute('aria-label'),
                nameShown: !!li.querySelector('.msg-name')?.checkVisibility(),
            }))""",
        )
        page.context.close()  # before its server stops
    # What the page should show, worked out here from the messages' own times (UTC).
    today = dt.datetime.now(dt.UTC).date()
    expected_days: list[str] = []
    previous: dict[str, Any] | None = None  # the message before
    adjacent = False  # ... and nothing but a day separator between
    checked = 0
    for row in rows:
        if not row["msg"]:
            if row["day"] is None:
                adjacent = False  # a notice between: the next message starts a new group
            continue
        when = dt.datetime.fromtimestamp(row["ts"] / 1000, dt.UTC)
        new_day = previous is None or (
            dt.datetime.fromtimestamp(previous["ts"] / 1000, dt.UTC).date() != when.date()
        )
        if new_day:
            label = {today: "Today", today - dt.timedelta(days=1): "Yesterday"}[when.date()]
            expected_days.append(label)
        grouped = (
            previous is not None
            and adjacent
            and not new_day
            and previous["name"] == row["name"]
            and (row["ts"] - previous["ts"]) / 1000 < GROUP_SECONDS
        )
        assert row["grouped"] == grouped, (row, previous)
        assert row["nameShown"] == (not grouped), row
        assert row["label"] == f"{row['name']}, {when:%H:%M}: {row['text']}"
        previous = row
        adjacent = True
        checked += 1
    assert checked == 8
    days = [row["day"] for row in rows if row["day"] is not None]
    assert days == expected_days
    assert days[0] == "Yesterday"
    assert days[-1] == "Today"
    # Each day separator sits right before the first message of its day.
    by_text = {row["text"]: row for row in rows if row["msg"]}
    assert by_text["y2"]["grouped"]
    assert not by_text["y3"]["grouped"]  # another sender
    assert not by_text["t2"]["grouped"]  # ten minutes after t1
    assert by_text["t3"]["grouped"]
    assert not by_text["t5"]["grouped"]  # carol came between
    first = rows.index(by_text["y1"])
    assert rows[first - 1]["day"] == "Yesterday"


# Each payload, and the links it must give (exact hrefs), nothing else.
LINK_PAYLOADS = [
    ("docs at https://example.com/a?b=1&c=2.", ["https://example.com/a?b=1&c=2"]),
    ("javascript:alert(1)", []),
    ("JAVASCRIPT://example.com/%0aalert(1)", []),
    ('<a href="javascript:alert(1)">click</a>', []),
    ("[click](javascript:alert(1)) or (see http://example.org/x)", ["http://example.org/x"]),
    ('http://evil.example/"onmouseover="alert(1)', ["http://evil.example/"]),
    ("data:text/html,<script>alert(1)</script>", []),
    (
        "<img src=x onerror=window.__xss=1> https://example.net/<b>bold</b>",
        ["https://example.net/"],
    ),
    (
        "two: http://a.example/1 and HTTPS://B.EXAMPLE/2!",
        ["http://a.example/1", "https://b.example/2"],
    ),
]


def test_page_links_are_safe(
    server: ServerProcess,
    open_at: OpenAt,  # noqa: F811 (the imported fixture)
) -> None:
    """Only http(s) URLs become links, opening in a new tab with rel="noopener
    noreferrer"; markup stays text, `javascript:` and `data:` never become links, no
    script runs, and each message's text is exactly what was sent."""
    page = open_at(server.base_url + "/")
    join(page, "alice")
    with raw_chat(server.port) as mallory:
        mallory.join("mallory")
        for text, _ in LINK_PAYLOADS:
            mallory.say(text)
        texts(page).to_have_text([text for text, _ in LINK_PAYLOADS], timeout=TIMEOUT)
    rows = page.locator("#messages .msg .msg-text")
    for index, (_, hrefs) in enumerate(LINK_PAYLOADS):
        links = rows.nth(index).locator("a")
        assert links.evaluate_all("as => as.map(a => a.href)") == [
            re.sub(r"^(https?://[^/]+)$", r"\1/", href).replace("B.EXAMPLE", "b.example")
            for href in hrefs
        ]
        for n in range(links.count()):
            expect(links.nth(n)).to_have_attribute("rel", "noopener noreferrer")
            expect(links.nth(n)).to_have_attribute("target", "_blank")
    # Inside a message, nothing but text and those links.
    tags = page.eval_on_selector_all("#messages .msg-text *", "els => els.map(e => e.tagName)")
    assert set(tags) <= {"A"}, tags
    expect(page.locator("a[href^='javascript' i], a[href^='data' i]")).to_have_count(0)
    expect(page.locator("body img, body script:not([src]), body b")).to_have_count(0)
    assert page.evaluate("typeof window.__xss") == "undefined"
    # A link is reachable and named by keyboard.
    expect(page.get_by_role("link", name="https://example.com/a?b=1&c=2")).to_be_visible()
