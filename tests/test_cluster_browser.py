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
stream: no sticky sessions needed.

Skips, or fails under TRIOCHAT_REQUIRE_BROWSER=1, without Chromium, nginx
or redis-server, like the other browser tests.
"""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from .nginxserver import NGINX, require, running_nginx
from .redisserver import REDIS_SERVER, free_port, redis_server
from .server_process import ServerProcess, run_server
from .test_browser import TIMEOUT, browser  # noqa: F401 (fixture reused)
from .test_browser_resilience import OpenPage, open_page, status, texts  # noqa: F401

if TYPE_CHECKING:
    from playwright.sync_api import Page

# Without Playwright the `browser` fixture skips (or fails) before `expect` is needed.
with suppress(ImportError):
    from playwright.sync_api import expect

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parent.parent
DEPLOY_CONF = REPO / "deploy" / "nginx.conf"
EXAMPLE_NODES = ("127.0.0.1:8181", "127.0.0.1:8182")  # the nodes deploy/nginx.conf names
LISTEN_80 = re.compile(r"^(\s*)listen 80;$", re.MULTILINE)
PROXY_PASS = re.compile(r"proxy_pass http://\w+;")
ROOM = "cluster"


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
    """The node's ``triochat_connections`` gauge, read from it directly (not through nginx)."""
    code, text = http_get(node.base_url + "/metrics")
    assert code == 200, text
    match = re.search(r"^triochat_connections (\S+)$", text, re.MULTILINE)
    assert match, f"no triochat_connections gauge in:\n{text}"
    return float(match.group(1))


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


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """Redis, two nodes on it, and nginx with deploy/nginx.conf in front of them."""
    require(NGINX, "nginx")
    require(REDIS_SERVER, "redis-server")
    with ExitStack() as stack:
        redis = stack.enter_context(redis_server(tmp_path / "redis"))
        nodes = [
            stack.enter_context(
                run_server(
                    "--redis", redis.url, "--data-dir", str(tmp_path / f"node{n}"), memory=False
                )
            )
            for n in (1, 2)
        ]
        yield Cluster(nodes, stack.enter_context(nginx_in_front(tmp_path, nodes)))


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
    each POST /sse/<session> to the node that does not hold his stream (it has fewer
    open connections), and the chat works all the same: no sticky sessions needed."""
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
    posts = fronts.upstreams(re.compile(r"POST /sse/\S+ 204"))
    assert len(posts) >= 5, posts  # bob's join and his four messages, at least
    assert any(port != stream_node.port for port in posts), (stream_node.port, posts)
