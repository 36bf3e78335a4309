"""The command line: options, environment, and the real process lifecycle."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys

import pytest
import trio

from triochat import Config
from triochat.cli import build_parser, config_from_args
from triochat.errors import ConfigError

from .chatclient import open_client
from .redisserver import RedisServer, redis_server
from .server_process import run_server

SECTION_5_OPTIONS = [
    "--max-frame-bytes",
    "--max-msg-chars",
    "--rate",
    "--burst",
    "--outbox-frames",
    "--outbox-bytes",
    "--max-rooms",
    "--max-conns-per-ip",
    "--max-pending-per-ip",
    "--max-pending",
    "--history-size",
    "--host",
    "--port",
    "--data-dir",
    "--memory",
    "--allow-origin",
    "--allow-host",
    "--trusted-proxy",
    "--ping-interval",
    "--ping-timeout",
    "--presence-grace",
    "--drain-timeout",
    "--close-timeout",
    "--redis",
    "--node-timeout",
    "--workers",
    "--backplane-timeout",
    "--log-level",
    "--log-format",
    "--metrics-port",
    "--metrics-host",
    "--certfile",
    "--keyfile",
]


def test_cli_help_documents_every_option():
    """--help names every option of docs/protocol.md §9 and its environment variable."""
    result = subprocess.run(
        [sys.executable, "-m", "triochat", "--help"], capture_output=True, text=True, check=True
    )
    for option in SECTION_5_OPTIONS:
        assert option in result.stdout, option
        env = "TRIOCHAT_" + option[2:].replace("-", "_").upper()
        assert env in result.stdout.replace("\n", " ").replace("  ", ""), env


def test_cli_defaults_match_protocol():
    """With no options and no environment, the limits are docs/protocol.md §9's defaults."""
    config = config_from_args([], {})
    assert (config.host, config.port) == ("127.0.0.1", 8181)
    assert config.max_frame_bytes == 65536
    assert config.max_msg_chars == 2000
    assert (config.rate, config.burst) == (10, 20)
    assert config.outbox_frames == 256
    assert config.outbox_bytes == 1 << 20
    assert config.max_rooms == 32
    assert config.max_conns_per_ip == 256
    assert (config.max_pending_per_ip, config.max_pending) == (32, 1024)
    assert config.allow_hosts == ()
    assert config.trusted_proxies == ()
    assert config.history_size == 1000
    assert (config.ping_interval, config.ping_timeout) == (20, 20)
    assert config.presence_grace == 5
    assert (config.drain_timeout, config.close_timeout) == (10, 5)
    assert config.node_timeout == 30
    assert not config.memory


def test_cli_environment_sets_and_command_line_wins():
    """TRIOCHAT_* variables set options; the command line beats them."""
    env = {
        "TRIOCHAT_MAX_FRAME_BYTES": "1000",
        "TRIOCHAT_RATE": "0",
        "TRIOCHAT_MEMORY": "1",
        "TRIOCHAT_ALLOW_ORIGIN": "http://a.example, http://b.example",
        "TRIOCHAT_PORT": "9000",
    }
    config = config_from_args(["--port", "9001"], env)
    assert config.max_frame_bytes == 1000
    assert config.rate == 0
    assert config.memory
    assert config.allow_origins == ("http://a.example", "http://b.example")
    assert config.port == 9001
    config = config_from_args(["--allow-origin", "*", "--allow-origin", "null"], env)
    assert config.allow_origins == ("*", "null")


def test_cli_log_format_and_metrics_listener_options():
    """--log-format (text by default) and --metrics-port/--metrics-host (off by
    default) come from the command line or TRIOCHAT_* (#11 §4)."""
    config = config_from_args([], {})
    assert (config.log_format, config.metrics_port, config.metrics_host) == ("text", None, None)
    env = {"TRIOCHAT_LOG_FORMAT": "JSON", "TRIOCHAT_METRICS_PORT": "9100"}
    config = config_from_args(["--metrics-host", "0.0.0.0"], env)
    assert (config.log_format, config.metrics_port, config.metrics_host) == (
        "json",
        9100,
        "0.0.0.0",
    )


def test_cli_allow_host_repeatable_and_from_environment():
    """--allow-host repeats; TRIOCHAT_ALLOW_HOST is comma-separated; the command line wins (#18)."""
    env = {
        "TRIOCHAT_ALLOW_HOST": " chat.example.com, Other.Example ,",
        "TRIOCHAT_MAX_PENDING": "9",
    }
    config = config_from_args([], env)
    assert config.allow_hosts == ("chat.example.com", "Other.Example")
    assert config.max_pending == 9
    config = config_from_args(["--allow-host", "a.example", "--allow-host", "*"], env)
    assert config.allow_hosts == ("a.example", "*")
    config = config_from_args(["--max-pending-per-ip", "0", "--max-pending", "0"], {})
    assert (config.max_pending_per_ip, config.max_pending) == (0, 0)


def test_cli_trusted_proxy_repeatable_and_from_environment():
    """--trusted-proxy repeats; TRIOCHAT_TRUSTED_PROXY is comma-separated; the command
    line wins; networks, bare addresses and host bits are taken as given (#11 §3)."""
    env = {"TRIOCHAT_TRUSTED_PROXY": " 10.0.0.0/8, ::1 ,,192.0.2.7/24"}
    assert config_from_args([], env).trusted_proxies == ("10.0.0.0/8", "::1", "192.0.2.7/24")
    config = config_from_args(
        ["--trusted-proxy", "127.0.0.1/32", "--trusted-proxy", "fd00::/8"], env
    )
    assert config.trusted_proxies == ("127.0.0.1/32", "fd00::/8")
    assert config_from_args(["--trusted-proxy", "127.0.0.1"], {}).trusted_proxies == ("127.0.0.1",)


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["--trusted-proxy", "localhost"], {}),
        (["--trusted-proxy", "10.0.0.0/33"], {}),
        (["--trusted-proxy", "127.0.0.1/32", "--trusted-proxy", "nginx"], {}),
        ([], {"TRIOCHAT_TRUSTED_PROXY": "127.0.0.1/32, 10.0.0.0/8/8"}),
        ([], {"TRIOCHAT_TRUSTED_PROXY": "[::1]"}),
    ],
)
def test_cli_trusted_proxy_bad_value_is_a_config_error(argv, env):
    """A --trusted-proxy entry that is no IP network or address is refused at start-up
    (ConfigError: exit 2) (#11 §3)."""
    with pytest.raises(ConfigError, match="trusted_proxies"):
        config_from_args(argv, env)


def test_cli_trusted_proxy_bad_value_exits_2_with_message():
    """The process reports a bad --trusted-proxy on stderr and exits 2, no traceback (#11 §3)."""
    result = subprocess.run(
        [sys.executable, "-m", "triochat", "--trusted-proxy", "nginx.internal"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "nginx.internal" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["--max-frame-bytes", "0"], {}),
        (["--outbox-frames", "-1"], {}),
        ([], {"TRIOCHAT_RATE": "fast"}),
        (["--log-level", "loud"], {}),
        (["--port", "70000"], {}),
        (["--redis", "http://127.0.0.1:6379"], {}),
        (["--max-pending-per-ip", "-1"], {}),
        (["--max-pending", "-1"], {}),
        (["--allow-host", "chat.example.com:443"], {}),
        (["--allow-host", "https://chat.example.com"], {}),
        ([], {"TRIOCHAT_ALLOW_HOST": "[::1]"}),
        ([], {"TRIOCHAT_REDIS": "localhost:6379"}),
        (["--log-format", "xml"], {}),
        ([], {"TRIOCHAT_METRICS_PORT": "70000"}),
        ([], {"TRIOCHAT_METRICS_PORT": "port"}),
        (["--port", "9000", "--metrics-port", "9000"], {}),
    ],
)
def test_cli_invalid_values_are_config_errors(argv, env):
    """Out-of-range or malformed values raise ConfigError (exit 2 with a message)."""
    with pytest.raises(ConfigError):
        config_from_args(argv, env)


def test_cli_invalid_value_exits_2_with_message():
    """The process reports a bad option on stderr and exits 2, with no traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "triochat", "--max-rooms", "0"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "max_rooms" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_unreachable_redis_fails_the_start_with_exit_1():
    """--redis to a port where nothing listens: one ERROR line naming Redis, exit 1,
    no traceback, within the handshake timeout (never a node serving without it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    result = subprocess.run(
        [
            *(sys.executable, "-m", "triochat", "--port", "0", "--handshake-timeout", "2"),
            *("--redis", f"redis://127.0.0.1:{port}/0"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "cannot reach Redis" in result.stderr
    assert "Traceback" not in result.stderr


REDIS_PASSWORD = "s3cret-pw"


def require_redis_password(redis: RedisServer, password: str) -> None:
    """Make ``redis`` ask for ``password`` (tests/redisserver.py starts it open)."""
    with socket.create_connection(("127.0.0.1", redis.port), timeout=5) as conn:
        conn.sendall(f"CONFIG SET requirepass {password}\r\n".encode())
        assert conn.recv(64).startswith(b"+OK")


def test_cli_redis_password_is_in_no_output_line_when_redis_is_reachable(tmp_path):
    """--redis with a password in the URL: the start-up line, the "joined the chat"
    line and the shutdown lines all show it as ``***``; the password is in no
    output line (#11 §1)."""
    with redis_server(tmp_path / "redis") as redis:
        require_redis_password(redis, REDIS_PASSWORD)
        url = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{redis.port}/0"
        with run_server("--redis", url) as proc:
            pass  # it listens: it reached Redis with the password, and stops on SIGTERM
        assert proc.proc.returncode == 0, proc.output_text()
    shown = f"redis://:***@127.0.0.1:{redis.port}/0"
    lines = proc.output
    assert any("redis: " + shown in line for line in lines), proc.output_text()
    assert any("joined the chat on " + shown in line for line in lines), proc.output_text()
    assert [line for line in lines if REDIS_PASSWORD in line] == []


def test_cli_bad_redis_url_error_hides_the_password():
    """A --redis URL that is refused is named in the error without its password."""
    with pytest.raises(ConfigError) as refused:
        config_from_args(["--redis", f"http://:{REDIS_PASSWORD}@127.0.0.1:6379/0"], {})
    assert REDIS_PASSWORD not in str(refused.value)
    assert "http://:***@127.0.0.1:6379/0" in str(refused.value)


@pytest.mark.parametrize("redis_answers", [False, True], ids=["unreachable", "wrong-password"])
def test_cli_redis_password_is_in_no_output_line_when_the_start_fails(tmp_path, redis_answers):
    """--redis with a password, and Redis cannot be used (nothing listens, or it
    refuses the password): exit 1 with the URL shown as ``***`` in the error; the
    password is on neither stream (#11 §1)."""
    with redis_server(tmp_path / "redis") as redis:
        require_redis_password(redis, "another-pw")
        if not redis_answers:
            redis.kill()  # its port is free again: nothing listens there
        url = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{redis.port}/0"
        result = subprocess.run(
            [
                *(sys.executable, "-m", "triochat", "--port", "0", "--handshake-timeout", "2"),
                *("--backplane-timeout", "2", "--redis", url),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert f"cannot reach Redis at redis://:***@127.0.0.1:{redis.port}/0" in result.stderr
    assert "Traceback" not in output
    assert [line for line in output.splitlines() if REDIS_PASSWORD in line] == []


def test_cli_zero_turns_off_rate_and_ip_limits():
    """--rate 0 and --max-conns-per-ip 0 are accepted (limits off)."""
    config = config_from_args(["--rate", "0", "--max-conns-per-ip", "0"], {})
    assert (config.rate, config.max_conns_per_ip) == (0, 0)
    assert isinstance(build_parser().format_help(), str)
    assert Config(rate=0).rate == 0


async def test_cli_sigterm_drains_with_1001_exits_0_and_keeps_history(tmp_path):
    """SIGTERM: clients get 1001, the process exits 0, and history is intact on the next start."""
    data_dir = str(tmp_path / "data")
    with trio.fail_after(40):
        with run_server("--data-dir", data_dir, memory=False) as proc:
            url = f"ws://127.0.0.1:{proc.port}/ws"
            async with open_client(url) as alice, open_client(url) as bob:
                await alice.join("lobby", "alice")
                await bob.join("lobby", "bob")
                acked = []
                for i in range(20):
                    await alice.say(f"m{i}", ref=f"r{i}")
                while len(acked) < 20:
                    frame = await alice.recv()
                    if frame["type"] == "ack":
                        acked.append(frame["id"])
                proc.proc.send_signal(signal.SIGTERM)
                assert (await alice.closed())[0] == 1001
                assert (await bob.closed())[0] == 1001
            returncode = await trio.to_thread.run_sync(proc.proc.wait)
            assert returncode == 0, proc.output_text()
            assert "Traceback" not in proc.output_text()
        with run_server("--data-dir", data_dir, memory=False) as proc:
            async with open_client(f"ws://127.0.0.1:{proc.port}/ws") as carol:
                joined = await carol.join("lobby", "carol")
                assert [m["id"] for m in joined["history"]] == acked
                assert [m["msg"] for m in joined["history"]] == [f"m{i}" for i in range(20)]
                await carol.say("after restart", ref="x")
                message = await carol.expect("message", msg="after restart")
                assert message["id"] not in acked, "ids are never reused"


async def test_cli_memory_restart_forgets_history_and_never_reuses_ids():
    """--memory: after a restart the old `since` is unknown (recovered false) and ids are new."""
    with trio.fail_after(30):
        with run_server() as proc:
            async with open_client(f"ws://127.0.0.1:{proc.port}/ws") as alice:
                await alice.join("lobby", "alice")
                await alice.say("before", ref="r")
                old = await alice.expect("message", msg="before")
        with run_server() as proc:
            async with open_client(f"ws://127.0.0.1:{proc.port}/ws") as alice:
                joined = await alice.join("lobby", "alice", since=old["id"])
                assert joined["recovered"] is False
                assert joined["history"] == []
                await alice.say("after", ref="r")
                new = await alice.expect("message", msg="after")
                assert new["id"] != old["id"]


def test_cli_history_with_a_newer_schema_exits_1_untouched(tmp_path):
    """A history file from a newer triochat (user_version past ours): one ERROR line saying
    so, exit 1, no traceback, no server, and the file keeps its version and rows (#11)."""
    import sqlite3

    from triochat.history.sqlite import DB_FILE, SCHEMA_VERSION

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    path = data_dir / DB_FILE
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.execute("CREATE TABLE messages (seq INTEGER PRIMARY KEY, room, id, name, msg, ts)")
    db.execute("INSERT INTO meta VALUES ('epoch', '0badc0de')")
    db.execute("INSERT INTO messages VALUES (1, 'lobby', '0badc0de-1', 'alice', 'hi', 1)")
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    before = path.read_bytes()
    result = subprocess.run(
        [sys.executable, "-m", "triochat", "--port", "0", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, result.stderr
    assert f"schema version {SCHEMA_VERSION + 1}, newer than this triochat" in errors[0]
    assert "Traceback" not in result.stderr
    assert "listening on" not in result.stderr
    assert path.read_bytes() == before
