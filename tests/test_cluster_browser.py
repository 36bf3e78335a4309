"""A cluster end to end: two nodes sharing one Redis, a real nginx running
deploy/nginx.conf in front of them, and two Chromium pages that chat.

nginx is Debian's. Its configuration is deploy/nginx.conf itself, rendered
with two changes: its example node addresses become the test's two nodes,
and its server listens on a free port instead of 80. To pin each page to
one node, the rendered file also gets one copy of the deploy file's
``server`` block per node, on a port of its own, whose ``proxy_pass``
targets an upstream that holds only that node. So every proxy setting the
pages go through (WebSocket upgrade, Host/Origin, SSE buffering, timeouts)
is the deploy file's, and each page's node is known. Each node's
``triochat_connections`` gauge shows that the pages really are on different
nodes. The deploy file's own server block (least_conn over both nodes) is
served too, for an SSE page whose POSTs land on the other node than its
stream: no sticky sessions needed. Through that balanced block too, a page
whose node is SIGKILLed fails over to the other node and misses nothing.

Skips, or fails under TRIOCHAT_REQUIRE_BROWSER=1, without Chromium, nginx
or redis-server, like the other browser tests.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .nginxserver import NGINX, require, running_nginx
from .redisserver import REDIS_SERVER, free_port, redis_server
from .server_process import ServerProcess, run_server
from .test_browser import TIMEOUT, browser  # noqa: F401 (fixture reused)
from .test_browser_resilience import (  # noqa: F401 (the open_page fixture is reused)
    CONNECTED,
    GRACE,
    OFFLINE,
    RECONNECT,
    OpenPage,
    join_room,
    observer,
    open_page,
    record_sent,
    status,
    texts,
)

if TYPE_CHECKING:
    from playwright.sync_api import Page

# Without Playwright the `browser` fixture skips (or fails) before `expect` is needed.
with suppress(ImportError):
    from playwright.sync_api import expect
    from websockets.sync.client import connect

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parent.parent
DEPLOY_CONF = REPO / "deploy" / "nginx.conf"
EXAMPLE_NODES = ("127.0.0.1:8181", "127.0.0.1:8182")  # the nodes deploy/nginx.conf names
LISTEN_80 = re.compile(r"^(\s*)listen 80;$", re.MULTILINE)
PROXY_PASS = re.compile(r"proxy_pass http://\w+;")
ROOM = "cluster"
# --node-timeout of the failover test, seconds. A node's heartbeat lives 2/3 of it
# and is renewed every 1/4, so a SIGKILLed node's users are dropped 3.3-7.3 s after
# the kill: well after the page is back (about 1 s, a few on a loaded machine), so
# its takeover shows no flicker.
NODE_TIMEOUT = 8.0


def block_end(text: str, start: int) -> int:
    """The index just past the ``}`` that closes the first ``{`` at or after ``start``."""
    depth = 0
    index = start
    while index < len(text):
        char = text[index]
        if char == "#":  # a comment runs to the end of the line
            newline = text.find("\n", index)
            index = len(text) if newline < 0 else newline
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return index + 1
        index += 1
    raise AssertionError(f"unbalanced braces in {DEPLOY_CONF}")


def render_deploy_conf(nodes: list[int], front: int, pinned: list[int]) -> str:
    """deploy/nginx.conf with the test's ``nodes`` and its server on ``front``, plus,
    for each node, a copy of its server block on ``pinned[i]`` that reaches only that node."""
    conf = DEPLOY_CONF.read_text()
    for example, port in zip(EXAMPLE_NODES, nodes, strict=True):
        assert example in conf, f"{DEPLOY_CONF} no longer names the example node {example}"
        conf = conf.replace(example, f"127.0.0.1:{port}")
    assert len(LISTEN_80.findall(conf)) == 1, f"{DEPLOY_CONF}: expected one `listen 80;`"
    server = re.search(r"^server\s*\{", conf, re.MULTILINE)
    assert server, f"{DEPLOY_CONF} has no server block"
    block = conf[server.start() : block_end(conf, server.start())]
    assert PROXY_PASS.search(block), f"{DEPLOY_CONF}: no proxy_pass in the server block"

    parts = [LISTEN_80.sub(rf"\g<1>listen 127.0.0.1:{front};", conf)]
    for number, (node, port) in enumerate(zip(nodes, pinned, strict=True), start=1):
        upstream = f"triochat_node{number}"
        copy = LISTEN_80.sub(rf"\g<1>listen 127.0.0.1:{port};", block)
        copy = PROXY_PASS.sub(f"proxy_pass http://{upstream};", copy)
        parts.append(
            f"# The deploy file's server block, reaching node {number} only.\n"
            f"upstream {upstream} {{\n    server 127.0.0.1:{node};\n}}\n{copy}\n"
        )
    return "\n".join(parts)


@dataclass
class Fronts:
    """nginx's URLs (the deploy file's own server, and one pinned to each node) and
    its access log (``method uri status upstream`` per finished request)."""

    balanced: str
    pinned: list[str]
    access_log: Path

    def upstreams(self, request: re.Pattern[str]) -> list[int]:
        """The node port of every finished request whose ``method uri status`` matches."""
        lines = self.access_log.read_text().splitlines()
        return [
            int(line.rsplit(":", 1)[1])
            for line in lines
            if request.fullmatch(line.rsplit(" ", 1)[0]) and ":" in line
        ]


@contextmanager
def nginx_in_front(tmp_path: Path, nodes: list[ServerProcess]) -> Iterator[Fronts]:
    """nginx with its own prefix and temp dirs, serving `render_deploy_conf`."""
    require(NGINX, "nginx")
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    front, *pinned = (free_port() for _ in range(1 + len(nodes)))
    (prefix / "triochat.conf").write_text(
        render_deploy_conf([node.port for node in nodes], front, pinned)
    )
    # deploy/nginx.conf is an http-context snippet, as in Debian's conf.d/.
    with running_nginx(
        prefix,
        f"include {prefix}/triochat.conf;",
        [front, *pinned],
        log_format="$request_method $uri $status $upstream_addr",
    ):
        yield Fronts(
            balanced=f"http://127.0.0.1:{front}",
            pinned=[f"http://127.0.0.1:{port}" for port in pinned],
            access_log=prefix / "access.log",
        )


def http_get(url: str) -> tuple[int, str]:
    """Status and body of a plain GET (an error status is returned, not raised)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def chat_connections(node: ServerProcess) -> float:
    """The node's ``triochat_connections`` gauge, summed over its ``transport``
    label, read from it directly (not through nginx)."""
    code, text = http_get(node.base_url + "/metrics")
    assert code == 200, text
    found = re.findall(r"^triochat_connections\{[^}]*\} (\S+)$", text, re.MULTILINE)
    assert found, f"no triochat_connections gauge in:\n{text}"
    return sum(float(value) for value in found)


def wait_for_connections(nodes: list[ServerProcess], expected: list[float]) -> None:
    deadline = time.monotonic() + TIMEOUT / 1000
    while (seen := [chat_connections(node) for node in nodes]) != expected:
        assert time.monotonic() < deadline, f"chat connections per node: {seen}, not {expected}"
        time.sleep(0.05)


def enter(page: Page, name: str, transport: str) -> None:
    """Join ROOM as ``name`` and wait for the chat view."""
    page.fill("#name", name)
    page.fill("#room", ROOM)
    page.click("#join")
    status(page).to_have_text(
        "connected (SSE)" if transport == "sse" else "connected", timeout=TIMEOUT
    )
    expect(page.locator("#input")).to_be_visible(timeout=TIMEOUT)


def send(page: Page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")
    expect(page.locator("#input")).to_have_value("", timeout=TIMEOUT)


def shown(page: Page) -> list[str]:
    return page.locator("#messages .msg .msg-text").all_inner_texts()


@dataclass
class Cluster:
    nodes: list[ServerProcess]
    fronts: Fronts


@contextmanager
def running_cluster(tmp_path: Path, *node_args: str) -> Iterator[Cluster]:
    """Redis, two nodes on it (each also given ``node_args``), and nginx with
    deploy/nginx.conf in front of them."""
    require(NGINX, "nginx")
    require(REDIS_SERVER, "redis-server")
    with ExitStack() as stack:
        redis = stack.enter_context(redis_server(tmp_path / "redis"))
        nodes = [
            stack.enter_context(
                run_server(
                    "--redis",
                    redis.url,
                    "--data-dir",
                    str(tmp_path / f"node{n}"),
                    *node_args,
                    memory=False,
                )
            )
            for n in (1, 2)
        ]
        yield Cluster(nodes, stack.enter_context(nginx_in_front(tmp_path, nodes)))


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """Redis, two nodes on it, and nginx with deploy/nginx.conf in front of them."""
    with running_cluster(tmp_path) as running:
        yield running


def converse(alice: Page, bob: Page) -> None:
    """alice and bob say things to each other: every message shows on both pages, in
    one order, and each sender's in the order sent."""
    # One at a time: each message crosses from one node to the other.
    send(alice, "hello from alice")
    texts(bob).to_have_text(["hello from alice"], timeout=TIMEOUT)
    send(bob, "hello from bob")
    conversation = ["hello from alice", "hello from bob"]
    for page in (alice, bob):
        texts(page).to_have_text(conversation, timeout=TIMEOUT)

    # Interleaved without waiting: whatever the order, it is the same on both pages,
    # and each sender's messages keep the order they were sent in.
    from_alice = [f"alice {n}" for n in range(1, 4)]
    from_bob = [f"bob {n}" for n in range(1, 4)]
    for mine, theirs in zip(from_alice, from_bob, strict=True):
        send(alice, mine)
        send(bob, theirs)
    total = len(conversation) + len(from_alice) + len(from_bob)
    for page in (alice, bob):
        texts(page).to_have_count(total, timeout=TIMEOUT)
        expect(page.locator("#messages .msg.pending")).to_have_count(0, timeout=TIMEOUT)
    on_alice, on_bob = shown(alice), shown(bob)
    assert on_alice == on_bob
    assert on_alice[: len(conversation)] == conversation
    rest = on_alice[len(conversation) :]
    assert [text for text in rest if text.startswith("alice")] == from_alice
    assert [text for text in rest if text.startswith("bob")] == from_bob


@pytest.mark.parametrize("bob_transport", ["ws", "sse"])
def test_two_pages_on_two_nodes_chat_through_nginx(
    open_page: OpenPage,  # noqa: F811 (the imported fixture)
    cluster: Cluster,
    bob_transport: str,
) -> None:
    """alice's page reaches node 1 and bob's node 2 (by WebSocket, or SSE), both through
    nginx running deploy/nginx.conf: each sees the other in the member list and every
    message of both, in one order on both pages."""
    nodes, fronts = cluster.nodes, cluster.fronts
    alice = open_page(fronts.pinned[0] + "/")
    bob = open_page(fronts.pinned[1] + ("/?transport=sse" if bob_transport == "sse" else "/"))
    enter(alice, "alice", "ws")
    enter(bob, "bob", bob_transport)
    for page in (alice, bob):
        expect(page.locator("#members li")).to_have_text(["alice", "bob"], timeout=TIMEOUT)
    # Each page's chat connection is on its own node, none elsewhere.
    wait_for_connections(nodes, [1.0, 1.0])

    converse(alice, bob)
    wait_for_connections(nodes, [1.0, 1.0])  # nobody reconnected on the way

    # The deploy file's own server block answers too, and keeps /metrics private.
    code, body = http_get(fronts.balanced + "/")
    assert code == 200
    assert "<html" in body.lower()
    assert http_get(fronts.balanced + "/metrics")[0] == 403


def test_sse_posts_through_the_balancer_reach_the_other_node(
    open_page: OpenPage,  # noqa: F811 (the imported fixture)
    cluster: Cluster,
) -> None:
    """bob chats over SSE through the deploy file's own server block: least_conn sends
    each POST /sse to the node that does not hold his stream (it has fewer open
    connections), and the chat works all the same: no sticky sessions needed. The
    session id travels in a header, so nginx's access log never sees it (#18)."""
    nodes, fronts = cluster.nodes, cluster.fronts
    alice = open_page(fronts.pinned[0] + "/")
    enter(alice, "alice", "ws")
    wait_for_connections(nodes, [1.0, 0.0])
    bob = open_page(fronts.balanced + "/?transport=sse")
    enter(bob, "bob", "sse")
    for page in (alice, bob):
        expect(page.locator("#members li")).to_have_text(["alice", "bob"], timeout=TIMEOUT)

    converse(alice, bob)
    counts = [chat_connections(node) for node in nodes]
    assert counts in ([2.0, 0.0], [1.0, 1.0]), counts
    stream_node = nodes[0] if counts == [2.0, 0.0] else nodes[1]
    posts = fronts.upstreams(re.compile(r"POST /sse 204"))
    assert not fronts.upstreams(re.compile(r"\S+ /sse/\S+ \d+")), "a session id in a path"
    assert len(posts) >= 5, posts  # bob's join and his four messages, at least
    assert any(port != stream_node.port for port in posts), (stream_node.port, posts)


def record_received(page: Page) -> list[dict[str, Any]]:
    """Every frame the page receives over a WebSocket from now on."""
    received: list[dict[str, Any]] = []

    def on_websocket(ws: Any) -> None:
        ws.on("framereceived", lambda payload: received.append(json.loads(payload)))

    page.on("websocket", on_websocket)
    return received


def node_with_the_connection(nodes: list[ServerProcess]) -> int:
    """The index of the one node that holds a chat connection, once exactly one does."""
    deadline = time.monotonic() + TIMEOUT / 1000
    while sorted(seen := [chat_connections(node) for node in nodes]) != [0.0, 1.0]:
        assert time.monotonic() < deadline, f"chat connections per node: {seen}"
        time.sleep(0.05)
    return seen.index(1.0)


def node_id(node: ServerProcess) -> str:
    """The cluster id the node logged when it joined the chat."""
    match = re.search(r"node (\S+) joined the chat", node.output_text())
    assert match, node.output_text()
    return match.group(1)


def wait_for_output(node: ServerProcess, text: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while text not in node.output_text():
        tail = node.output_text()[-3000:]
        assert time.monotonic() < deadline, f"{text!r} not logged within {seconds} s:\n{tail}"
        time.sleep(0.05)


def test_page_fails_over_to_the_other_node_and_misses_nothing(
    open_page: OpenPage,  # noqa: F811 (the imported fixture)
    tmp_path: Path,
) -> None:
    """alice's page reaches a node through the deploy file's own server block; that node
    is SIGKILLed. While her page is offline bob, on the other node, says three things.
    The page reconnects by itself through nginx, which tries the dead node first and
    passes the handshake on to the live one (proxy_next_upstream), takes its name back
    with its token, and shows bob's messages once each, in order; nobody sees alice
    leave or twice, not even once the dead node's heartbeat has run out; and what she
    says next reaches bob."""
    args = ("--node-timeout", str(NODE_TIMEOUT), "--presence-grace", GRACE)
    with running_cluster(tmp_path, *args) as cluster:
        nodes, fronts = cluster.nodes, cluster.fronts
        page = open_page(fronts.balanced + "/")
        # The page's timers run on a clock the test can pause (it flows normally until then).
        page.clock.install()
        page.reload()
        received = record_received(page)
        join_room(page, "alice")
        token = page.evaluate("JSON.parse(sessionStorage.getItem('triochat')).token")
        assert isinstance(token, str)
        assert token
        landed = node_with_the_connection(nodes)
        doomed, survivor = nodes[landed], nodes[1 - landed]
        doomed_id = node_id(doomed)
        balanced_ws = fronts.balanced.replace("http://", "ws://") + "/ws"

        # An idle connection through the balancer lands on the other node (least_conn), so
        # once the page's connection is gone, nginx tries the dead node first for it.
        with connect(balanced_ws, open_timeout=5), observer(survivor.port, "bob") as bob:
            wait_for_connections([doomed, survivor], [1.0, 2.0])
            assert bob.joined["members"] == ["alice", "bob"]
            expect(page.locator("#members li")).to_have_text(["alice", "bob"], timeout=TIMEOUT)
            before = "before the failover"
            before_id = bob.say(before)
            texts(page).to_have_text([before], timeout=TIMEOUT)
            sent = record_sent(page)

            # Pause the page's timers, so its reconnect waits until bob has spoken.
            page.clock.pause_at(page.evaluate("Date.now()") / 1000 + 0.5)
            doomed.kill()
            status(page).to_have_text(OFFLINE, timeout=TIMEOUT)
            missed = [f"while alice was away {n}" for n in range(1, 4)]
            missed_ids = [bob.say(text) for text in missed]
            page.clock.resume()  # the page's own retry timer reconnects it
            resumed = time.monotonic()

            texts(page).to_have_text([before, *missed], timeout=RECONNECT)
            status(page).to_have_text(CONNECTED, timeout=TIMEOUT)
            reconnected_after = time.monotonic() - resumed
            expect(page.locator("#retry")).to_be_hidden()
            wait_for_connections([survivor], [3.0])  # + the page, through nginx
            # nginx tried the dead node first and passed the handshake on.
            refused = re.compile(
                r"connect\(\) failed .* while connecting to upstream, .*"
                rf'request: "GET /ws HTTP/1\.1", upstream: "http://127\.0\.0\.1:{doomed.port}/ws"'
            )
            errors = (fronts.access_log.parent / "error.log").read_text()
            assert refused.search(errors), errors
            # It rejoined as alice, with its token and the last id it had seen; the
            # other node's `joined` replayed exactly what it missed.
            joins = [frame for frame in sent if frame["type"] == "join"]
            assert len(joins) == 1, joins
            assert joins[0]["name"] == "alice"
            assert joins[0]["token"] == token
            assert joins[0]["rotate"] is True  # the page asks for a new token each time
            assert joins[0]["since"] == before_id
            rejoined = [frame for frame in received if frame["type"] == "joined"][-1]
            assert rejoined["name"] == "alice"
            assert rejoined["token"] not in ("", token)
            stored = page.evaluate("JSON.parse(sessionStorage.getItem('triochat')).token")
            assert stored == rejoined["token"]  # kept for the next reconnect
            assert rejoined["recovered"] is True
            assert [m["id"] for m in rejoined["history"]] == missed_ids
            assert rejoined["members"] == ["alice", "bob"]

            # The dead node's heartbeat runs out: the survivor drops that node's users,
            # but alice is the survivor's own now.
            wait_for_output(survivor, f"node {doomed_id} is gone", NODE_TIMEOUT + TIMEOUT / 1000)
            with observer(survivor.port, "carol") as carol:
                assert carol.joined["members"] == ["alice", "bob", "carol"]
                carol.send({"type": "leave", "room": "lobby"})
                carol.wait_for(lambda f: f["type"] == "left")
            expect(page.locator("#members li")).to_have_text(["alice", "bob"], timeout=TIMEOUT)
            expect(page.locator("#members li.me")).to_have_text(["alice"])

            back = "back on the other node"
            send(page, back)
            bob.wait_for(lambda f: f["type"] == "message" and f["msg"] == back)
            texts(page).to_have_text([before, *missed, back], timeout=TIMEOUT)
            expect(page.locator("#messages .msg.pending")).to_have_count(0, timeout=TIMEOUT)
            expect(page.locator("#messages .gap")).to_have_count(0)
            # carol's leave is shown once it has settled (2 s, docs/protocol.md §3).
            bob.wait_for(
                lambda f: (
                    f["type"] == "presence" and f["name"] == "carol" and f["event"] == "leave"
                )
            )
            bob.listen(0.5)  # a duplicate, or a late presence change, would come right behind
            assert bob.said("alice") == [back]
            # alice neither left nor joined again: she was back well before the dead
            # node's heartbeat ran out, so taking her name over showed no flicker.
            assert bob.presence("alice") == [], (bob.presence("alice"), reconnected_after)
            assert bob.presence("carol") == ["join", "leave"]
            assert bob.closed is None
