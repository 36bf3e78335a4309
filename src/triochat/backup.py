"""``triochat backup --data-dir DIR OUT``: a consistent copy of the history, online.

The copy is made with SQLite's online backup API in one step, that is inside
one read transaction on the live file. The server keeps the file in WAL
mode, so its writers are not blocked meanwhile, and the copy is the
database as of one commit: every message acked before the backup started is
in it (a message is acked only after its commit), none is half there.

Rule 1: OUT is never overwritten; it is created exclusively, and removed
  again if anything fails, so a file at OUT is always a complete, checked copy.
Rule 2: DIR is never created and the history in it is only read: the
  source is opened ``mode=rw``, which does not create a missing file (a WAL
  reader writes the shared-memory index anyway). On a stopped server SQLite
  checkpoints its log when this last connection closes, which changes no
  content.
Rule 3: the copy is marked as a backup (`BACKUP_MARK`), so that a server
  started on it begins a new epoch: ids handed out after the copy was taken
  are never handed out again (history/sqlite.py, `SqliteHistory._epoch_of`).

This is a command of its own with no event loop, so the SQLite calls are
plain blocking calls (the server's history runs them in worker threads).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import sqlite3
import sys
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from .config import Config
from .errors import StorageError
from .history.sqlite import BACKUP_MARK, DB_FILE

__all__ = ["BackupReport", "backup_history", "backup_main"]

BUSY_TIMEOUT: Final = 10_000  # milliseconds: wait out the server's own commits


@dataclass(frozen=True)
class BackupReport:
    """What a finished backup holds."""

    source: Path
    out: Path
    messages: int
    rooms: int
    schema_version: int


def backup_history(data_dir: Path, out: Path) -> BackupReport:
    """Copy ``<data_dir>/history.sqlite3`` to ``out``, consistently, while it is in use.

    Raises:
        StorageError: ``data_dir`` holds no history, ``out`` exists, or the
            copy failed (then nothing is left at ``out``).
    """
    source_path = data_dir / DB_FILE
    if not source_path.is_file():
        raise StorageError(f"no history at {source_path}")
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise StorageError(f"{out} exists; a backup never overwrites a file") from None
    except OSError as exc:
        raise StorageError(f"cannot create {out}: {exc}") from exc
    os.close(fd)
    try:
        report = _copy(source_path, out)
        _fsync(out)
        _fsync(out.parent)
    except BaseException:
        for path in (out, Path(f"{out}-journal")):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        raise
    return report


def _copy(source_path: Path, out: Path) -> BackupReport:
    uri = f"file:{urllib.parse.quote(str(source_path.resolve()))}?mode=rw"
    try:
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as source:
            source.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT}")
            tables = {name for (name,) in source.execute("SELECT name FROM sqlite_master")}
            if not {"meta", "messages"} <= tables:
                raise StorageError(f"{source_path} is not a triochat history")
            with contextlib.closing(sqlite3.connect(out)) as copy:
                # pages=-1: the whole file in one step, so in one read
                # transaction (several steps would restart on every commit
                # of a busy server, or copy a mix of two states).
                source.backup(copy, pages=-1)
                # The pages came with the source's WAL flag; a backup is one
                # self-contained file, with no -wal/-shm beside it.
                copy.execute("PRAGMA journal_mode = DELETE")
                taken = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
                copy.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (BACKUP_MARK, taken))
                copy.commit()
                (check,) = copy.execute("PRAGMA quick_check").fetchone()
                if check != "ok":
                    raise StorageError(f"the copy at {out} failed its check: {check}")
                (version,) = copy.execute("PRAGMA user_version").fetchone()
                messages, rooms = copy.execute(
                    "SELECT count(*), count(DISTINCT room) FROM messages"
                ).fetchone()
    except sqlite3.Error as exc:
        raise StorageError(f"cannot back up {source_path} to {out}: {exc}") from exc
    return BackupReport(source_path, out, messages, rooms, version)


def _fsync(path: Path) -> None:
    """The copy survives a power cut once the command said it is done."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def backup_main(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    """``triochat backup``: parse, copy, report; the exit status.

    ``--data-dir`` defaults like the server's: ``TRIOCHAT_DATA_DIR``, else
    ``./triochat-data``, so the same environment finds the same history.
    """
    parser = argparse.ArgumentParser(
        prog="triochat backup",
        description="Copy the SQLite history to OUT, consistently, while the server "
        "runs (SQLite's online backup). OUT must not exist. Restore: stop the "
        "server, put the copy in place of DIR/history.sqlite3 (and remove "
        "history.sqlite3-wal and -shm), start it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(environ.get("TRIOCHAT_DATA_DIR") or Config().data_dir),
        help="the server's --data-dir [env TRIOCHAT_DATA_DIR]",
    )
    parser.add_argument("out", type=Path, metavar="OUT", help="the file to write")
    args = parser.parse_args(argv)
    try:
        report = backup_history(args.data_dir, args.out)
    except StorageError as exc:
        print(f"triochat backup: {exc}", file=sys.stderr)
        return 1
    print(
        f"triochat backup: {report.messages} messages in {report.rooms} rooms "
        f"(schema version {report.schema_version}) copied from {report.source} "
        f"to {report.out}"
    )
    return 0
