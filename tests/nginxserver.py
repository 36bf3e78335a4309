"""A real nginx for tests: Debian's binary, run in the foreground with a prefix of its own.

Plain synchronous stdlib code, usable from sync tests (like server_process.py
and redisserver.py). `running_nginx` writes a main config (one worker, no
master, pid, logs and temp dirs all under the prefix) around the test's own
``http {}`` body, has ``nginx -t`` check it, starts nginx, waits until every
port the test named accepts connections, and stops nginx on exit.

Without nginx the test is skipped, or fails under TRIOCHAT_REQUIRE_BROWSER=1
(CI), like the other browser tests (`require`).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import textwrap
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
    from pathlib import Path

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
START_DEADLINE = 10.0  # seconds for nginx to listen on every port
STOP_DEADLINE = 10.0  # seconds for nginx to exit on SIGTERM before it is killed
TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def require(executable: str, package: str) -> None:
    """Skip without ``executable``, or fail when TRIOCHAT_REQUIRE_BROWSER=1 (CI)."""
    if shutil.which(executable) is None:
        problem = f"{executable} is missing (Debian package {package!r})"
        if os.environ.get("TRIOCHAT_REQUIRE_BROWSER") == "1":
            pytest.fail(f"TRIOCHAT_REQUIRE_BROWSER=1 but {problem}", pytrace=False)
        pytest.skip(problem)


def accepts(port: int) -> bool:
    """True when something accepts TCP connections on 127.0.0.1:``port``."""
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def main_conf(prefix: Path, http_conf: str, log_format: str | None = None) -> str:
    """nginx.conf for a foreground nginx whose files all live under ``prefix``,
    with ``http_conf`` inside ``http {}`` and, if given, ``log_format`` for the access log."""
    access_log = f"access_log {prefix}/access.log"
    http = []
    if log_format is not None:
        http.append(f"log_format test '{log_format}';")
        access_log += " test"
    http.append(f"{access_log};")
    http += [f"{name}_temp_path {prefix / name};" for name in TEMP_DIRS]
    http.append(textwrap.dedent(http_conf).strip())
    body = textwrap.indent("\n".join(http), "    ")
    return f"""\
worker_processes 1;
master_process off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 256; }}
http {{
{body}
}}
"""


@contextmanager
def running_nginx(
    prefix: Path, http_conf: str, ports: Sequence[int], *, log_format: str | None = None
) -> Iterator[Path]:
    """nginx serving ``http_conf`` (the body of its ``http {}`` block), listening on every
    one of ``ports``; yields ``prefix``, which holds nginx.conf, access.log and error.log.

    ``prefix`` may already exist (with files ``http_conf`` includes). nginx is
    terminated, or killed if it does not exit, when the block ends.
    """
    require(NGINX, "nginx")
    prefix.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(main_conf(prefix, http_conf, log_format))
    error_log = prefix / "error.log"
    command = [NGINX, "-p", str(prefix), "-c", str(conf), "-e", str(error_log)]
    check = subprocess.run(
        [*command, "-t"], capture_output=True, text=True, timeout=30, check=False
    )
    assert check.returncode == 0, f"nginx -t refused {conf}:\n{check.stderr}"
    proc = subprocess.Popen(
        [*command, "-g", "daemon off;"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + START_DEADLINE
        for port in ports:
            while not accepts(port):
                errors = error_log.read_text() if error_log.exists() else ""
                assert proc.poll() is None, f"nginx exited ({proc.returncode}):\n{errors}"
                assert time.monotonic() < deadline, f"nginx is not listening on {port}:\n{errors}"
                time.sleep(0.05)
        yield prefix
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_DEADLINE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
