"""`Server.run` and `serve_until_signalled` raise a failed start-up plainly (#17 item 4):
callers catch `OSError` and `StorageError` without unwrapping exception groups."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from triochat import Config, Server
from triochat.errors import StorageError
from triochat.server import serve_until_signalled


async def test_server_run_raises_a_plain_oserror_when_the_port_is_taken() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match="in use") as caught:
            await Server(Config(port=port, memory=True)).run()
        assert not isinstance(caught.value, BaseExceptionGroup)


async def test_serve_until_signalled_raises_a_plain_storage_error(tmp_path: Path) -> None:
    data_dir = tmp_path / "not-a-directory"
    data_dir.write_text("a file where the history directory should be")
    with pytest.raises(StorageError):
        await serve_until_signalled(Config(port=0, data_dir=data_dir))


def test_process_port_taken_exits_1_with_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "triochat", "--memory", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 1, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


async def test_server_run_still_serves_after_the_change() -> None:
    """The unwrapping is for start-up failures only: a normal run and drain end cleanly."""
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(Server(Config(port=0, memory=True)).run)
        server.drain()
