"""History in SQLite (the default): one file under ``--data-dir``.

Writes run in a worker thread (`trio.to_thread`), one batch per
transaction, so the event loop never waits on the disk and an `ack` follows
the commit. One connection, used by one task at a time (the hub's store
loop), hence ``check_same_thread=False``.
"""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import trio

from ..errors import StorageError
from ..protocol import Message, seq_of
from . import Snapshot

__all__ = ["SqliteHistory"]

DB_FILE: Final = "history.sqlite3"

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    seq  INTEGER PRIMARY KEY,
    room TEXT NOT NULL,
    id   TEXT NOT NULL,
    name TEXT NOT NULL,
    msg  TEXT NOT NULL,
    ts   INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_room ON messages (room, seq);
"""

_TRIM: Final = """
DELETE FROM messages WHERE room = ?1 AND seq < (
    SELECT seq FROM messages WHERE room = ?1 ORDER BY seq DESC LIMIT 1 OFFSET ?2
)
"""

_LOAD: Final = """
SELECT room, id, name, msg, ts FROM (
    SELECT *, ROW_NUMBER() OVER (PARTITION BY room ORDER BY seq DESC) AS newest
    FROM messages
) WHERE newest <= ? ORDER BY seq
"""


class SqliteHistory:
    """Stores messages in ``<data_dir>/history.sqlite3``, newest N per room."""

    def __init__(self, data_dir: Path, history_size: int) -> None:
        self._path = data_dir / DB_FILE
        self._data_dir = data_dir
        self._size = history_size
        self._db: sqlite3.Connection | None = None
        self._epoch = ""

    async def load(self) -> Snapshot:
        return await trio.to_thread.run_sync(self._load)

    def _load(self) -> Snapshot:
        try:
            self._data_dir.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode = WAL")
            # FULL: a committed (hence acked) batch survives a power cut too.
            db.execute("PRAGMA synchronous = FULL")
            db.execute("PRAGMA busy_timeout = 2000")
            db.executescript(_SCHEMA)
            row = db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
            if row is None:
                # A new (or lost) store: a new epoch, so no old id is reused.
                epoch = secrets.token_hex(4)
                db.execute("INSERT INTO meta VALUES ('epoch', ?)", (epoch,))
            else:
                epoch = row[0]
            (max_seq,) = db.execute("SELECT coalesce(max(seq), 0) FROM messages").fetchone()
            rooms: dict[str, list[Message]] = {}
            for room, message_id, name, msg, ts in db.execute(_LOAD, (self._size,)):
                rooms.setdefault(room, []).append(Message(room, message_id, name, msg, ts))
        except (sqlite3.Error, OSError) as exc:
            raise StorageError(f"cannot open history at {self._path}: {exc}") from exc
        self._db = db
        self._epoch = epoch
        return Snapshot(epoch=epoch, next_seq=max_seq + 1, rooms=rooms)

    async def append(self, batch: Sequence[Message]) -> None:
        await trio.to_thread.run_sync(self._append, batch)

    def _append(self, batch: Sequence[Message]) -> None:
        db = self._db
        if db is None:
            raise StorageError("history is closed")
        rows = [(seq_of(self._epoch, m.id), m.room, m.id, m.name, m.msg, m.ts) for m in batch]
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?)", rows)
                for room in {m.room for m in batch}:
                    db.execute(_TRIM, (room, self._size - 1))
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StorageError(f"history write failed: {exc}") from exc

    async def aclose(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            await trio.to_thread.run_sync(db.close)
