"""The JavaScript client module (static/triochat-client.js) tested with Node's own
test runner (``node --test``) against a real server.

Each file under tests/js/ runs in one ``node --test`` process with the server's
URL in ``TRIOCHAT_URL``; node's output is the failure message. Node has a
global WebSocket from version 22; on 20 and 21 it needs
``--experimental-websocket``, which is added when ``node`` lacks one. Without
Node the tests skip, unless TRIOCHAT_NO_SKIPS=1 or TRIOCHAT_REQUIRE_BROWSER=1
(CI), where they fail.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from .server_process import run_server

JS_DIR = Path(__file__).resolve().parent / "js"
JS_TESTS = sorted(JS_DIR.glob("*.test.mjs"))
NODE_MIN = 20  # node:test with describe/test, fetch streams, --experimental-websocket
NODE_TIMEOUT = 240.0  # seconds for one file's run
# Test-only credentials for the files that need authentication (docs/protocol.md
# §15, §16); the file gets them in TRIOCHAT_TEST_JWT_SECRET and TRIOCHAT_TEST_API_KEY
# (not TRIOCHAT_JWT_SECRET, which the server itself would read).
JWT_SECRET = "js-client-test-secret"
API_KEY = "js-client-test-api-key"
AUTH_FILES = frozenset({"auth.test.mjs"})


def _require_node() -> tuple[str, list[str]]:
    """The node executable and the flags it needs for a global WebSocket."""
    problem = None
    node = shutil.which("node")
    flags: list[str] = []
    if node is None:
        problem = "node is not installed (Debian package 'nodejs')"
    else:
        version = subprocess.run(
            [node, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout.strip()
        major = re.match(r"v(\d+)\.", version)
        if not major or int(major.group(1)) < NODE_MIN:
            problem = f"node {version or '?'} is older than {NODE_MIN}"
        else:
            for candidate in ([], ["--experimental-websocket"]):
                probe = subprocess.run(
                    [
                        node,
                        *candidate,
                        "-e",
                        "process.exit(typeof WebSocket === 'function' ? 0 : 1)",
                    ],
                    capture_output=True,
                    timeout=30,
                    check=False,
                )
                if probe.returncode == 0:
                    flags = candidate
                    break
            else:
                problem = f"node {version} has no WebSocket, even with --experimental-websocket"
    if problem:
        required = "1" in (
            os.environ.get("TRIOCHAT_NO_SKIPS"),
            os.environ.get("TRIOCHAT_REQUIRE_BROWSER"),
        )
        if required:
            pytest.fail(f"the JavaScript client tests are required but {problem}", pytrace=False)
        pytest.skip(f"JavaScript client tests skipped: {problem}")
    assert node is not None
    return node, flags


@pytest.mark.parametrize("js_test", JS_TESTS, ids=[p.name for p in JS_TESTS])
def test_js_client(js_test: Path) -> None:
    """Every test in the file passes against a real server (rate limits off, grace 1 s;
    for AUTH_FILES with a JWT secret and an API key)."""
    node, flags = _require_node()
    auth = js_test.name in AUTH_FILES
    extra = ("--jwt-secret", JWT_SECRET, "--api-key", API_KEY) if auth else ()
    with run_server("--rate", "0", "--presence-grace", "1", *extra) as server:
        env = {**os.environ, "TRIOCHAT_URL": server.base_url, "NO_COLOR": "1"}
        if auth:
            env |= {"TRIOCHAT_TEST_JWT_SECRET": JWT_SECRET, "TRIOCHAT_TEST_API_KEY": API_KEY}
        try:
            run = subprocess.run(
                [node, *flags, "--test", "--test-reporter=spec", str(js_test)],
                capture_output=True,
                text=True,
                timeout=NODE_TIMEOUT,
                env=env,
                cwd=JS_DIR.parent.parent,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"node --test {js_test.name} ran over {NODE_TIMEOUT} s:\n{exc.stdout}")
    if run.returncode != 0:
        pytest.fail(
            f"node --test {js_test.name} failed (exit {run.returncode}):\n"
            f"{run.stdout}\n{run.stderr}\n--- server log ---\n{server.output_text()[-4000:]}",
            pytrace=False,
        )


def test_js_tests_are_found() -> None:
    """The glob finds the client's test files (an empty parametrisation would pass silently)."""
    assert {p.name for p in JS_TESTS} >= {"client.test.mjs", "resilience.test.mjs", *AUTH_FILES}
