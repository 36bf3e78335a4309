"""The page on a bad network: reconnecting, resuming, queued messages, the SSE fallback.

Headless Chromium (the module-scoped `browser` fixture of test_browser.py,
with its skip/fail policy) against real server processes. Networks are made
to misbehave with a test-controlled TCP proxy (tests/tcpproxy.py), a SIGKILLed
and restarted server, and a real nginx that does not pass WebSocket upgrades.
A Python WebSocket client (the `websockets` sync client) connected straight
to the server is the observer: it sees what everyone else would see.

Waits are Playwright `expect(...)` or bounded waits for a frame; fixed waits
are only used, short, to show that something does *not* happen.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .nginxserver import running_nginx
from .redisserver import free_port
from .server_process import run_server
from .tcpproxy import TcpProxy
from .test_browser import DESKTOP, TIMEOUT, browser, join, say  # noqa: F401 (fixture reused)

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

try:
    from playwright.sync_api import expect
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import ClientConnection, connect
except ImportError:  # pragma: no cover - the `browser` fixture skips or fails first
    pass

pytestmark = pytest.mark.browser

RECONNECT = 20_000  # ms: a reconnect may wait out a few backoff steps (0.5, 1, 2, 4 s, jittered)
GRACE = "1"  # --presence-grace, seconds
# The chat connection: the WebSocket at /ws, the SSE stream and its POSTs at /sse.
# These tests make it fail on purpose (a stopped server, a cut proxy, nginx without
# upgrades), so Chromium's reports of its failures are expected here; any other
# failure (a 404 for a static file, a refused request for anything else) is not (#15).
CONNECTION_URL = re.compile(r"^(?:wss?|https?)://[^/]+/(?:ws|sse)(?:[?#]|$)")
WEBSOCKET_FAILED = re.compile(r"^WebSocket connection to '([^']+)' failed")


def connection_failure(msg: Any) -> bool:
    """Is this console error Chromium's report of a failed chat connection?"""
    failed = WEBSOCKET_FAILED.match(msg.text)
    if failed:
        return bool(CONNECTION_URL.match(failed.group(1)))
    # A resource that failed to load is named only by the message's location.
    if msg.text.startswith("Failed to load resource"):
        return bool(CONNECTION_URL.match(msg.location.get("url") or ""))
    return False


CONNECTED = re.compile(r"^connected")
# The status in plain words (#15): no close codes, a countdown to the next try.
OFFLINE = re.compile(r"^can't reach the server, retrying in \d+ s$")

OpenPage = Callable[[str], "Page"]


@pytest.fixture
def open_page(browser: Browser) -> Iterator[OpenPage]:  # noqa: F811 (the imported fixture)
    """Factory: a page at ``url`` in its own browser context.

    Fails the test if a page throws, logs a console error or has a request fail,
    other than the failures of the chat connection (/ws, /sse) these tests cause on
    purpose (an aborted request, as on closing a page, excepted).
    """
    contexts = []
    problems: list[str] = []

    def on_console(msg: Any) -> None:
        if msg.type == "error" and not connection_failure(msg):
            problems.append(f"console: {msg.text} ({msg.location.get('url')})")

    def on_request_failed(request: Any) -> None:
        failure = request.failure
        if failure and "ERR_ABORTED" not in failure and not CONNECTION_URL.match(request.url):
            problems.append(f"request failed: {request.method} {request.url} {failure}")

    def factory(url: str) -> Page:
        context = browser.new_context(viewport=DESKTOP)
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda err: problems.append(f"uncaught: {err}"))
        page.on("console", on_console)
        page.on("requestfailed", on_request_failed)
        page.goto(url)
        return page

    yield factory
    for context in contexts:
        context.close()
    assert not problems, f"the page reported errors: {problems}"


class Observer:
    """A Python WebSocket client straight to the server, keeping every frame it got."""

    def __init__(
        self, ws: ClientConnection, name: str, room: str = "lobby", token: str | None = None
    ) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []
        self.closed: ConnectionClosed | None = None
        self.room = room
        self._refs = 0
        join_frame = {"type": "join", "room": room, "name": name}
        if token:
            join_frame["token"] = token
        self.send(join_frame)
        self.joined = self.wait_for(lambda f: f["type"] == "joined")

    def send(self, frame: dict[str, Any]) -> None:
        self.ws.send(json.dumps(frame))

    def say(self, text: str) -> str:
        """Say ``text`` and wait for its ack; the message id."""
        self._refs += 1
        ref = f"obs-{self._refs}"
        self.send({"type": "say", "room": self.room, "msg": text, "ref": ref})
        return str(self.wait_for(lambda f: f["type"] == "ack" and f["ref"] == ref)["id"])

    def _receive(self, timeout: float) -> dict[str, Any] | None:
        try:
            frame: dict[str, Any] = json.loads(self.ws.recv(timeout=max(timeout, 0.001)))
        except TimeoutError:
            return None
        except ConnectionClosed as exc:
            self.closed = exc
            raise
        self.frames.append(frame)
        return frame

    def wait_for(
        self, match: Callable[[dict[str, Any]], bool], timeout: float = TIMEOUT / 1000
    ) -> dict[str, Any]:
        """The next frame that matches (earlier ones are kept in ``frames``)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            frame = self._receive(left)
            if frame is not None and match(frame):
                return frame
        raise AssertionError(f"no matching frame within {timeout} s; got {self.frames}")

    def listen(self, seconds: float) -> None:
        """Keep every frame that comes within ``seconds`` (to show something does not come)."""
        deadline = time.monotonic() + seconds
        with suppress(ConnectionClosed):
            while (left := deadline - time.monotonic()) > 0:
                self._receive(left)

    def said(self, name: str) -> list[str]:
        return [f["msg"] for f in self.frames if f["type"] == "message" and f["name"] == name]

    def presence(self, name: str) -> list[str]:
        return [f["event"] for f in self.frames if f["type"] == "presence" and f["name"] == name]


@contextmanager
def observer(port: int, name: str, **options: Any) -> Iterator[Observer]:
    """An `Observer` that joined ``options.get("room", "lobby")`` as ``name``."""
    with connect(f"ws://127.0.0.1:{port}/ws", open_timeout=5) as ws:
        yield Observer(ws, name, **options)


def join_room(page: Page, name: str) -> None:
    """`join` from test_browser, then wait for the chat view: the room is joined."""
    join(page, name)
    expect(page.locator("#input")).to_be_visible(timeout=TIMEOUT)
    expect(page.locator("#members li", has_text=name)).to_have_count(1, timeout=TIMEOUT)


def record_sent(page: Page) -> list[dict[str, Any]]:
    """Every frame the page sends from now on, over a WebSocket or as an SSE POST."""
    sent: list[dict[str, Any]] = []

    def on_websocket(ws: Any) -> None:
        ws.on("framesent", lambda payload: sent.append(json.loads(payload)))

    def on_request(request: Any) -> None:
        # POST /sse (the page's form) or /sse/<session> (the older one).
        if request.method == "POST" and re.search(r"^https?://[^/]+/sse(/|$)", request.url):
            sent.append(json.loads(request.post_data))

    page.on("websocket", on_websocket)
    page.on("request", on_request)
    return sent


def texts(page: Page) -> Any:
    return expect(page.locator("#messages .msg .msg-text"))


def status(page: Page) -> Any:
    return expect(page.locator("#status"))


def test_page_reconnects_after_server_restart_and_shows_missed_messages(
    open_page: OpenPage, tmp_path: Path
) -> None:
    """SIGKILL the server, restart it on the same port and data dir: the page reconnects
    by itself and shows what bob said meanwhile, in order, each once, with no gap."""
    args = ("--data-dir", str(tmp_path / "data"), "--presence-grace", GRACE)
    with run_server(*args, memory=False) as first:
        port = first.port
        page = open_page(first.base_url + "/")
        join_room(page, "alice")
        token = page.evaluate("JSON.parse(sessionStorage.getItem('triochat')).token")
        with observer(port, "bob") as bob:
            bob.say("before the crash")
            say(page, "hi bob")
            last_seen = bob.wait_for(lambda f: f["type"] == "message" and f["msg"] == "hi bob")
            texts(page).to_have_text(["before the crash", "hi bob"], timeout=TIMEOUT)
            sent = record_sent(page)
            first.kill()
        status(page).to_have_text(OFFLINE, timeout=TIMEOUT)

    missed = ["while you were away 1", "while you were away 2", "while you were away 3"]
    with run_server(*args, memory=False, port=port), observer(port, "bob") as bob:
        for text in missed:
            bob.say(text)
        texts(page).to_have_text(["before the crash", "hi bob", *missed], timeout=RECONNECT)
        status(page).to_have_text(CONNECTED, timeout=TIMEOUT)
        expect(page.locator("#retry")).to_be_hidden()
        # It rejoined with its resume token and the last id it had seen.
        joins = [f for f in sent if f["type"] == "join"]
        assert joins
        assert joins[-1]["since"] == last_seen["id"]
        assert joins[-1]["token"] == token
        say(page, "back")
        bob.wait_for(lambda f: f["type"] == "message" and f["msg"] == "back")
        texts(page).to_have_text(["before the crash", "hi bob", *missed, "back"])
        expect(page.locator("#messages .gap")).to_have_count(0)
        expect(page.locator("#messages .msg.pending")).to_have_count(0)


@pytest.fixture
def proxied(open_page: OpenPage) -> Iterator[tuple[Page, TcpProxy, int]]:
    """A server (grace 1 s), a TCP proxy in front of it, and alice's page through the proxy."""
    with run_server("--presence-grace", GRACE) as server, TcpProxy(server.port) as proxy:
        page = open_page(proxy.url + "/")
        join_room(page, "alice")
        yield page, proxy, server.port


def test_drop_longer_than_grace_shows_leave_then_join(proxied: tuple[Page, TcpProxy, int]) -> None:
    """The page's TCP connection is cut and new ones refused for longer than the grace
    period: bob sees alice leave; once the network is back, she rejoins by herself."""
    page, proxy, port = proxied
    with observer(port, "bob") as bob:
        assert bob.joined["members"] == ["alice", "bob"]
        proxy.refuse()
        proxy.cut()
        status(page).to_have_text(OFFLINE, timeout=TIMEOUT)
        bob.wait_for(lambda f: f["type"] == "presence" and f["name"] == "alice")
        proxy.accept()
        bob.wait_for(lambda f: f["type"] == "presence" and f["name"] == "alice", RECONNECT / 1000)
        assert bob.presence("alice") == ["leave", "join"]
        status(page).to_have_text(CONNECTED, timeout=TIMEOUT)
        expect(page.locator("#members li")).to_have_text(["alice", "bob"], timeout=TIMEOUT)


def test_drop_shorter_than_grace_shows_no_presence_change(
    proxied: tuple[Page, TcpProxy, int],
) -> None:
    """The page's TCP connection is cut and the page reconnects within the grace period
    (its resume token takes the name back): bob sees neither a leave nor a join."""
    page, proxy, port = proxied
    with observer(port, "bob") as bob:
        before = proxy.accepted
        proxy.cut()
        proxy.wait_accepted(before + 1)  # the page's new connection
        status(page).to_have_text(CONNECTED, timeout=TIMEOUT)
        say(page, "still here")
        bob.wait_for(lambda f: f["type"] == "message" and f["msg"] == "still here")
        bob.listen(float(GRACE) + 0.5)  # past the grace period of the cut connection
        assert bob.presence("alice") == []
        assert bob.said("alice") == ["still here"]
        assert bob.closed is None


def test_messages_typed_offline_are_delivered_exactly_once(
    proxied: tuple[Page, TcpProxy, int],
) -> None:
    """A say whose answer was lost with its connection, and says typed while the network
    refuses connections, are shown as pending, then delivered once each after the page
    reconnects (here via "Retry now"); nothing stays pending."""
    page, proxy, port = proxied
    with observer(port, "bob") as bob:
        # The server gets this one, but its `message` and `ack` never reach the page.
        proxy.hold_replies()
        say(page, "answer lost")
        bob.wait_for(lambda f: f["type"] == "message" and f["msg"] == "answer lost")
        expect(page.locator("#messages .msg.pending .msg-text")).to_have_text(["answer lost"])
        proxy.refuse()
        proxy.cut()
        proxy.release_replies()
        status(page).to_have_text(OFFLINE, timeout=TIMEOUT)
        offline = ["typed offline 1", "typed offline 2", "typed offline 3"]
        for text in offline:
            say(page, text)
        expect(page.locator("#messages .msg.pending .msg-text")).to_have_text(
            ["answer lost", *offline]
        )
        expect(page.locator("#messages .msg.pending .msg-state").last).to_have_text(
            "waiting for the connection"
        )
        proxy.accept()
        # "Retry now" (a no-op if the page's own timer just reconnected it).
        page.locator("#retry").dispatch_event("click")
        texts(page).to_have_text(["answer lost", *offline], timeout=TIMEOUT)
        expect(page.locator("#messages .msg.pending")).to_have_count(0, timeout=TIMEOUT)
        status(page).to_have_text(CONNECTED, timeout=TIMEOUT)
        bob.wait_for(lambda f: f["type"] == "message" and f["msg"] == offline[-1])
        bob.listen(1.0)  # a duplicate would come right behind
        assert bob.said("alice") == ["answer lost", *offline]
        texts(page).to_have_text(["answer lost", *offline])


def test_long_gap_is_announced_and_filled_from_history(open_page: OpenPage) -> None:
    """More than 200 messages missed: the rejoin answers `recovered: false`; the page says
    so (a `.gap` line) and pages back with `history` until the gap is closed, so every
    missed message shows, in order, each once."""
    with run_server("--rate", "0", "--presence-grace", GRACE) as server:
        with TcpProxy(server.port) as proxy, observer(server.port, "bob") as bob:
            page = open_page(proxy.url + "/")
            join_room(page, "alice")
            bob.say("before")
            texts(page).to_have_text(["before"], timeout=TIMEOUT)
            proxy.refuse()
            proxy.cut()
            status(page).to_have_text(OFFLINE, timeout=TIMEOUT)
            missed = [f"missed {n}" for n in range(1, 211)]
            for text in missed:
                bob.say(text)
            proxy.accept()
            page.locator("#retry").dispatch_event("click")
            texts(page).to_have_text(["before", *missed], timeout=RECONNECT)
            gap = page.locator("#messages .sys.gap")
            expect(gap).to_have_count(1)
            expect(gap).to_contain_text("the messages you missed are shown below")
            # The notice sits where the gap was: after "before", before "missed 1".
            order = page.eval_on_selector_all(
                "#messages > .msg, #messages > .gap",
                "rows => rows.map(r => r.classList.contains('gap') ? 'GAP' : r.innerText)",
            )
            assert order[1] == "GAP", order[:3]


@contextmanager
def nginx_without_upgrade(tmp_path: Path, upstream_port: int) -> Iterator[str]:
    """nginx on a free port proxying to the server, without the Upgrade/Connection
    headers (so WebSockets fail, like behind many corporate proxies); its URL."""
    port = free_port()
    server = f"""
        server {{
            listen 127.0.0.1:{port};
            location / {{
                proxy_pass http://127.0.0.1:{upstream_port};
                proxy_http_version 1.1;
                proxy_buffering off;
                proxy_set_header Host $http_host;
            }}
        }}
    """
    with running_nginx(tmp_path / "nginx", server, [port]):
        yield f"http://127.0.0.1:{port}"


def test_page_falls_back_to_sse_behind_nginx_without_websockets(
    open_page: OpenPage, tmp_path: Path
) -> None:
    """Behind an nginx that drops WebSocket upgrades the page switches to SSE by itself
    and chats with a page connected directly by WebSocket; `?transport=ws` there does not."""
    with run_server() as server, nginx_without_upgrade(tmp_path, server.port) as front:
        alice = open_page(front + "/")
        alice.fill("#name", "alice")
        alice.click("#join")
        status(alice).to_have_text("connected (SSE fallback)", timeout=RECONNECT)
        expect(alice.locator("#input")).to_be_visible(timeout=TIMEOUT)
        bob = open_page(server.base_url + "/")
        join_room(bob, "bob")
        expect(alice.locator("#members li")).to_have_text(["alice", "bob"], timeout=TIMEOUT)
        say(alice, "hello over SSE")
        say(bob, "hello over WebSocket")
        for page in (alice, bob):
            texts(page).to_have_text(["hello over SSE", "hello over WebSocket"], timeout=TIMEOUT)
            expect(page.locator("#messages .msg.pending")).to_have_count(0, timeout=TIMEOUT)

        carol = open_page(front + "/?transport=ws")
        carol.fill("#name", "carol")
        carol.click("#join")
        status(carol).to_have_text(OFFLINE, timeout=TIMEOUT)
        carol.wait_for_timeout(1500)  # long enough for two failed WebSockets and a switch
        status(carol).not_to_have_text(re.compile("connected|SSE"))
        expect(bob.locator("#members li")).to_have_text(["alice", "bob"])


def test_forced_sse_chats_and_a_takeover_stops_it(open_page: OpenPage) -> None:
    """`?transport=sse` chats over SSE; when another client takes the name over with the
    resume token (close 4001), the page says "open in another tab" and does not reconnect."""
    with run_server("--presence-grace", GRACE) as server:
        alice = open_page(server.base_url + "/?transport=sse")
        alice.fill("#name", "alice")
        alice.click("#join")
        status(alice).to_have_text("connected (SSE)", timeout=TIMEOUT)
        expect(alice.locator("#input")).to_be_visible(timeout=TIMEOUT)
        with observer(server.port, "bob") as bob:
            expect(alice.locator("#members li")).to_have_text(["alice", "bob"], timeout=TIMEOUT)
            say(alice, "over SSE")
            bob.wait_for(lambda f: f["type"] == "message" and f["msg"] == "over SSE")
            bob.say("over WebSocket")
            texts(alice).to_have_text(["over SSE", "over WebSocket"], timeout=TIMEOUT)

            token = alice.evaluate("JSON.parse(sessionStorage.getItem('triochat')).token")
            assert isinstance(token, str)
            assert token
            sse_requests: list[str] = []
            alice.on("request", lambda r: sse_requests.append(r.url) if "/sse" in r.url else None)
            with observer(server.port, "alice", token=token) as other_tab:
                status(alice).to_have_text("open in another tab", timeout=TIMEOUT)
                expect(alice.locator("#input")).to_be_disabled()
                expect(alice.locator("#retry")).to_have_text("Use here")
                other_tab.listen(2.0)  # several backoff steps: no reconnect takes it back
                assert other_tab.closed is None
                assert sse_requests == []
                status(alice).to_have_text("open in another tab")
                other_tab.say("from the other tab")
                bob.wait_for(lambda f: f["type"] == "message" and f["msg"] == "from the other tab")
            assert bob.presence("alice") == []  # a takeover shows no presence change


def test_memory_restart_replaces_the_loading_notice(open_page: OpenPage) -> None:
    """A server under --memory restarts with nothing: the rejoin answers `recovered:
    false` with no history, and the gap notice says what happened instead of "loading
    what the server still has…" forever (#15)."""
    with run_server("--presence-grace", GRACE) as first:
        port = first.port
        page = open_page(first.base_url + "/")
        join_room(page, "alice")
        with observer(port, "bob") as bob:
            bob.say("before the restart")
            texts(page).to_have_text(["before the restart"], timeout=TIMEOUT)
        first.kill()
        status(page).to_have_text(OFFLINE, timeout=TIMEOUT)
    with run_server("--presence-grace", GRACE, port=port):
        status(page).to_have_text(CONNECTED, timeout=RECONNECT)
        gap = page.locator("#messages .sys.gap")
        expect(gap).to_have_text(
            "You were offline for a while: some messages you missed could not be recovered.",
            timeout=TIMEOUT,
        )
        texts(page).to_have_text(["before the restart"])
        say(page, "after the restart")
        texts(page).to_have_text(["before the restart", "after the restart"], timeout=TIMEOUT)
        expect(page.locator("#messages .msg.pending")).to_have_count(0, timeout=TIMEOUT)
        page.context.close()  # before its server stops: no reconnect noise
