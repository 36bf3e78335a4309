"""One node as a service (#11): the systemd unit, and online backups under write load."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from triochat import Config
from triochat.history.sqlite import DB_FILE, SCHEMA_VERSION

from .chatclient import open_client
from .server_process import run_server

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "deploy" / "triochat.service"
INSTALLED = "/opt/triochat/bin/triochat"


def unit_settings(text: str) -> dict[str, list[str]]:
    """``Section.Key`` -> every value it is given, in order (systemd's INI dialect)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


def venv_triochat() -> str:
    """The `triochat` script of the Python running the tests (the unit's ExecStart)."""
    script = Path(sys.executable).parent / "triochat"
    found = str(script) if script.exists() else shutil.which("triochat")
    assert found, "no `triochat` script next to the test's Python nor on PATH"
    return found


@pytest.fixture
def systemd_analyze() -> str:
    """The `systemd-analyze` binary; missing, it fails the test under TRIOCHAT_NO_SKIPS=1."""
    path = shutil.which("systemd-analyze")
    if path is None:
        reason = "systemd-analyze is not installed (Debian package `systemd`)"
        if os.environ.get("TRIOCHAT_NO_SKIPS") == "1":
            pytest.fail(f"{reason}; TRIOCHAT_NO_SKIPS=1: the unit must be verified here")
        pytest.skip(reason)
    return path


def local_unit(tmp_path: Path, text: str | None = None) -> Path:
    """The unit (or ``text``), with ExecStart at this venv's script so it exists here."""
    text = UNIT.read_text() if text is None else text
    assert INSTALLED in text
    path = tmp_path / "triochat.service"
    path.write_text(text.replace(INSTALLED, venv_triochat()))
    return path


def verify(tool: str, unit: Path) -> list[str]:
    """`systemd-analyze verify`: the problems it reports about ``unit`` (none: valid).

    It exits 0 on some problems (an unknown key is only a warning, "ignoring"),
    so every line it prints about the unit counts, as does a non-zero status.
    """
    result = subprocess.run(
        [tool, "verify", "--recursive-errors=no", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = (result.stdout + result.stderr).splitlines()
    problems = [line for line in output if unit.name in line]
    if result.returncode != 0:
        problems.append(f"exit status {result.returncode}: {output}")
    return problems


# --- the unit ---------------------------------------------------------------------------


def test_deploy_unit_is_hardened_as_documented():
    """deploy/triochat.service sets every hardening option #11 asks for."""
    settings = unit_settings(UNIT.read_text())
    expected = {
        "DynamicUser": "yes",
        "StateDirectory": "triochat",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "RestrictNamespaces": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "CapabilityBoundingSet": "",
        "UMask": "0077",
        "Restart": "on-failure",
        "KillSignal": "SIGTERM",
    }
    for key, value in expected.items():
        assert settings.get(f"Service.{key}") == [value], key
    assert "@system-service" in settings["Service.SystemCallFilter"]
    assert int(settings["Service.LimitNOFILE"][0]) >= 65536
    assert settings["Install.WantedBy"] == ["multi-user.target"]


def test_deploy_unit_runs_the_venv_install_on_the_state_directory():
    """ExecStart is the venv's script with --data-dir the StateDirectory (/var/lib/triochat)."""
    settings = unit_settings(UNIT.read_text())
    (exec_start,) = settings["Service.ExecStart"]
    argv = exec_start.split()
    assert argv[0] == INSTALLED
    state = settings["Service.StateDirectory"][0]
    assert argv[argv.index("--data-dir") + 1] == f"/var/lib/{state}"


def test_deploy_unit_stop_timeout_outlasts_the_drain():
    """TimeoutStopSec leaves the drain (--drain-timeout, then closing the history) time
    to finish before systemd's SIGKILL."""
    settings = unit_settings(UNIT.read_text())
    defaults = Config()
    assert int(settings["Service.TimeoutStopSec"][0]) >= 2 * (
        defaults.drain_timeout + defaults.close_timeout
    )


def test_deploy_unit_passes_systemd_analyze_verify(tmp_path, systemd_analyze):
    """`systemd-analyze verify` finds nothing wrong with the unit (run on a copy whose
    ExecStart is this venv's `triochat`, since verify needs the binary to exist)."""
    assert verify(systemd_analyze, local_unit(tmp_path)) == []


def test_deploy_unit_security_exposure_is_low(tmp_path, systemd_analyze):
    """`systemd-analyze security --offline` rates the unit's exposure at most 2.0 ("OK")."""
    unit = local_unit(tmp_path)
    result = subprocess.run(
        [systemd_analyze, "security", "--offline=yes", "--threshold=20", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("old", "new", "reported"),
    [
        ("UMask=0077\n", "UMask=0077\nHardening=yes\n", "Unknown key"),
        ("Restart=on-failure\n", "Restart=sometimes\n", "sometimes"),
        ("LimitNOFILE=65536\n", "LimitNOFILE=lots\n", "lots"),
        ("SystemCallFilter=@system-service\n", "SystemCallFilter=@no-such-set\n", "no-such-set"),
        (INSTALLED, "/nonexistent/bin/triochat", "not executable"),
    ],
)
def test_deploy_verify_reports_a_broken_unit(tmp_path, systemd_analyze, old, new, reported):
    """The check can fail: a unit with an unknown key, a bad value or a missing binary is
    reported (an unknown key only warns, with exit status 0: the output counts)."""
    text = UNIT.read_text()
    assert text.count(old) == 1, old
    broken = text.replace(old, new)
    if new.startswith("/nonexistent"):
        path = tmp_path / "triochat.service"
        path.write_text(broken)
    else:
        path = local_unit(tmp_path, broken)
    problems = verify(systemd_analyze, path)
    assert any(reported in line for line in problems), problems


# --- backup ---------------------------------------------------------------------------


def run_backup(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "triochat", "backup", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def copy_ids(path: Path) -> list[str]:
    db = sqlite3.connect(path)
    try:
        return [row[0] for row in db.execute("SELECT id FROM messages ORDER BY seq")]
    finally:
        db.close()


class AckLog:
    """The ids acked to one client, in order, and a way to wait for the n-th."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self._waiting: list[tuple[int, trio.Event]] = []

    def add(self, message_id: str) -> None:
        self.ids.append(message_id)
        for count, event in self._waiting:
            if len(self.ids) >= count:
                event.set()

    async def wait_for(self, count: int) -> None:
        if len(self.ids) >= count:
            return
        event = trio.Event()
        self._waiting.append((count, event))
        await event.wait()


async def test_backup_under_write_load_holds_everything_acked_before_it(tmp_path):
    """`triochat backup` of a server taking says non-stop: exit 0; the copy is one
    consistent state (a prefix of the acked ids, no holes) holding every message acked
    before the backup started; it opens, and a server started on it serves it (#11)."""
    data_dir = tmp_path / "data"
    out = tmp_path / "backup.sqlite3"
    # No trimming (every message stays comparable) and no rate limit (load).
    options = ("--data-dir", str(data_dir), "--history-size", "1000000", "--rate", "0")
    with trio.fail_after(90):
        with run_server(*options, memory=False) as proc:
            acks = AckLog()
            async with open_client(f"ws://127.0.0.1:{proc.port}/ws") as alice:
                await alice.join("lobby", "alice")
                in_flight = trio.Semaphore(16)

                async def say_forever() -> None:
                    for i in range(10**9):
                        await in_flight.acquire()
                        await alice.say(f"m{i}", ref=f"r{i}")

                async def read_acks() -> None:
                    while True:
                        frame = await alice.recv()
                        if frame["type"] == "ack":
                            acks.add(frame["id"])
                            in_flight.release()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(say_forever)
                    nursery.start_soon(read_acks)
                    await acks.wait_for(300)
                    acked_before = list(acks.ids)
                    backup = ("backup", "--data-dir", str(data_dir), str(out))
                    result = await trio.run_process(
                        [sys.executable, "-m", "triochat", *backup],
                        capture_stdout=True,
                        capture_stderr=True,
                        check=False,
                    )
                    acked_during = len(acks.ids) - len(acked_before)
                    # Writes go on after the backup, and every message the copy can
                    # hold has had its ack read once these arrive.
                    await acks.wait_for(len(acks.ids) + 200)
                    nursery.cancel_scope.cancel()
            all_acked = list(acks.ids)
        output = result.stdout.decode() + result.stderr.decode()
        assert result.returncode == 0, output
        assert "messages" in output
        assert acked_during > 0, "no say was acked while the backup ran: no load"

        ids = copy_ids(out)
        assert set(acked_before) <= set(ids)
        assert ids == all_acked[: len(ids)], "the copy is not one consistent state"
        assert len(ids) < len(all_acked)
        db = sqlite3.connect(out)
        try:
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
            assert db.execute("PRAGMA journal_mode").fetchone() == ("delete",)
        finally:
            db.close()
        assert oct(out.stat().st_mode & 0o777) == "0o600"

        # Restore: a server started on the copy serves its history, under a new
        # epoch (the old server gave out ids past the copy: never again).
        restored = tmp_path / "restored"
        restored.mkdir()
        shutil.copyfile(out, restored / DB_FILE)
        old_epoch = ids[0].rpartition("-")[0]
        texts = dict(zip(all_acked, (f"m{i}" for i in range(len(all_acked))), strict=True))
        with run_server("--data-dir", str(restored), memory=False) as proc:
            async with open_client(f"ws://127.0.0.1:{proc.port}/ws") as carol:
                joined = await carol.join("lobby", "carol", since=acked_before[-1])
                assert joined["recovered"] is False, "old ids must not resume"
                history = joined["history"]
                assert [m["msg"] for m in history] == [texts[i] for i in ids[-100:]]
                new_epoch = history[0]["id"].rpartition("-")[0]
                assert new_epoch != old_epoch
                assert [m["id"] for m in history] == [
                    f"{new_epoch}-{i.rpartition('-')[2]}" for i in ids[-100:]
                ]
                await carol.say("after restore", ref="x")
                message = await carol.expect("message", msg="after restore")
                assert message["id"] not in all_acked, "ids are never reused"


def test_backup_without_history_fails_and_creates_nothing(tmp_path):
    """A data dir with no history: exit 1 with a message; neither DIR nor OUT is created."""
    data_dir = tmp_path / "nothing-here"
    out = tmp_path / "backup.sqlite3"
    result = run_backup("--data-dir", data_dir, out)
    assert result.returncode == 1
    assert "no history at" in result.stderr
    assert "Traceback" not in result.stderr
    assert not data_dir.exists()
    assert not out.exists()


def test_backup_never_overwrites_out(tmp_path):
    """OUT exists: exit 1 with a message, OUT untouched."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    db = sqlite3.connect(data_dir / DB_FILE)
    db.executescript("CREATE TABLE meta (key, value); CREATE TABLE messages (seq, room);")
    db.close()
    out = tmp_path / "backup.sqlite3"
    out.write_bytes(b"an older backup")
    result = run_backup("--data-dir", data_dir, out)
    assert result.returncode == 1
    assert "exists" in result.stderr
    assert out.read_bytes() == b"an older backup"


def test_backup_refuses_a_file_that_is_not_a_history(tmp_path):
    """A database without triochat's tables: exit 1 with a message, and no OUT left."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    db = sqlite3.connect(data_dir / DB_FILE)
    db.execute("CREATE TABLE something_else (x)")
    db.close()
    out = tmp_path / "backup.sqlite3"
    result = run_backup("--data-dir", data_dir, out)
    assert result.returncode == 1
    assert "not a triochat history" in result.stderr
    assert not out.exists()
