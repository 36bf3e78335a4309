"""History in SQLite (the default): one file under ``--data-dir``.

Writes run in a worker thread (`trio.to_thread`), one batch per
transaction, so the event loop never waits on the disk and an `ack` follows
the commit. One connection, used by one task at a time (the hub's store
loop), hence ``check_same_thread=False``.
"""

from __future__ import annotations

import logging
import secrets
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import trio

from .. import __version__
from ..errors import StorageError
from ..protocol import Message, seq_of
from ..recent import Snapshot, message_bytes

__all__ = ["BACKUP_MARK", "DB_FILE", "SCHEMA_VERSION", "SqliteHistory"]

LOGGER = logging.getLogger("triochat.history.sqlite")

DB_FILE: Final = "history.sqlite3"

# Schema versions, kept in the file's `PRAGMA user_version`.
#
# Rule 1: _MIGRATIONS[v] takes a file from version v to v + 1; the layout
#   this code reads and writes is version len(_MIGRATIONS). A released step is
#   never edited: a change of layout appends a step.
# Rule 2: every step a start needs runs in one transaction with the new
#   user_version, so a failed or interrupted migration leaves the file as it
#   was (SQLite's DDL is transactional).
# Rule 3: a file newer than this code is refused, untouched: an older server
#   cannot know what a newer layout means (docs/operations.md, "Upgrades").
#
# Plain statements, not one script: `executescript` would commit the
# transaction that rule 2 needs.
_MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    # 0 -> 1: the first layout. IF NOT EXISTS because files written before
    # the version was kept have these tables at user_version 0: they are
    # version 1 and only get stamped.
    (
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        """CREATE TABLE IF NOT EXISTS messages (
            seq  INTEGER PRIMARY KEY,
            room TEXT NOT NULL,
            id   TEXT NOT NULL,
            name TEXT NOT NULL,
            msg  TEXT NOT NULL,
            ts   INTEGER NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS messages_by_room ON messages (room, seq)",
    ),
)

#: The schema version this code reads and writes.
SCHEMA_VERSION: Final = len(_MIGRATIONS)

#: The `meta` key `triochat backup` puts in its copy (the time it was taken):
#: the first start on that file begins a new epoch (`SqliteHistory._epoch_of`).
BACKUP_MARK: Final = "backup_taken"

#: A row's size as `recent.message_bytes` counts it (``--max-stored-bytes``).
_BYTES: Final = (
    "length(CAST(room AS BLOB)) + length(id) + length(CAST(name AS BLOB))"
    " + length(CAST(msg AS BLOB))"
)

_TRIM: Final = f"""
DELETE FROM messages WHERE room = ?1 AND seq < (
    SELECT seq FROM messages WHERE room = ?1 ORDER BY seq DESC LIMIT 1 OFFSET ?2
) RETURNING {_BYTES}
"""

#: The oldest messages of any room, a slice at a time (``--max-stored-bytes``).
_OLDEST: Final = f"SELECT seq, {_BYTES} FROM messages ORDER BY seq LIMIT 64"

#: The rooms written most recently, newest first (a snapshot holds those).
_NEWEST_ROOMS: Final = "SELECT room FROM messages GROUP BY room ORDER BY max(seq) DESC LIMIT ?"

_RECENT: Final = """
SELECT room, id, name, msg, ts FROM messages WHERE room = ? ORDER BY seq DESC LIMIT ?
"""


class SqliteHistory:
    """Stores messages in ``<data_dir>/history.sqlite3``, newest N per room.

    Args:
        max_bytes: bytes kept in all (`recent.message_bytes`); past it, the
            oldest messages of any room are deleted in the same transaction
            (0: no bound).
        snapshot_rooms: rooms a snapshot holds at most, the most recently
            written (`History.load`).
    """

    append_nowait = None  # every commit runs in a worker thread (`append`)

    def __init__(
        self, data_dir: Path, history_size: int, *, max_bytes: int = 0, snapshot_rooms: int = 1000
    ) -> None:
        self._path = data_dir / DB_FILE
        self._data_dir = data_dir
        self._size = history_size
        self._max_bytes = max_bytes
        self._snapshot_rooms = snapshot_rooms
        self._db: sqlite3.Connection | None = None
        self._epoch = ""
        #: What the stored messages add up to (`recent.message_bytes`).
        self.stored_bytes = 0
        #: Messages deleted to stay within ``max_bytes``, since start.
        self.trimmed = 0
        # Worker threads take turns on the one connection: a read again (`load`)
        # must not see a batch that `_append` has not committed yet.
        self._lock = threading.Lock()

    async def load(self) -> Snapshot:
        return await trio.to_thread.run_sync(self._load)

    def _load(self) -> Snapshot:
        if self._db is not None:
            return self._load_again(self._db)
        db: sqlite3.Connection | None = None
        try:
            self._data_dir.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA busy_timeout = 2000")
            # FULL: a committed (hence acked) batch survives a power cut too.
            db.execute("PRAGMA synchronous = FULL")
            epoch = self._migrate(db)
            # After the version check, so a refused (newer) file is not touched.
            db.execute("PRAGMA journal_mode = WAL")
            snapshot = self._read(db, epoch)
        except (sqlite3.Error, OSError, StorageError) as exc:
            if db is not None:
                db.close()
            if isinstance(exc, StorageError):
                raise
            raise StorageError(f"cannot open history at {self._path}: {exc}") from exc
        self._db = db
        self._epoch = epoch
        return snapshot

    def _load_again(self, db: sqlite3.Connection) -> Snapshot:
        """Read the open store again (`History.load`: a node that attaches later)."""
        try:
            with self._lock:
                return self._read(db, self._epoch)
        except sqlite3.Error as exc:
            raise StorageError(f"history read failed: {exc}") from exc

    def _read(self, db: sqlite3.Connection, epoch: str) -> Snapshot:
        (max_seq, stored) = db.execute(
            f"SELECT coalesce(max(seq), 0), coalesce(sum({_BYTES}), 0) FROM messages"
        ).fetchone()
        self.stored_bytes = stored
        limit = self._snapshot_rooms
        names = [room for (room,) in db.execute(_NEWEST_ROOMS, (limit + 1,))]
        rooms = {room: self._recent(db, room) for room in names[:limit]}
        return Snapshot(
            epoch=epoch, next_seq=max_seq + 1, rooms=rooms, complete=len(names) <= limit
        )

    def _recent(self, db: sqlite3.Connection, room: str) -> list[Message]:
        rows = db.execute(_RECENT, (room, self._size)).fetchall()
        return [Message(*row) for row in reversed(rows)]

    async def recent(self, room: str) -> list[Message]:
        return await trio.to_thread.run_sync(self._read_recent, room)

    def _read_recent(self, room: str) -> list[Message]:
        db = self._db
        if db is None:
            raise StorageError("history is closed")
        try:
            with self._lock:
                return self._recent(db, room)
        except sqlite3.Error as exc:
            raise StorageError(f"history read failed: {exc}") from exc

    def _migrate(self, db: sqlite3.Connection) -> str:
        """Bring the file to `SCHEMA_VERSION` (rules above) and return its epoch.

        Raises:
            StorageError: the file is newer than this code, or a step failed;
                either way the transaction was rolled back: nothing changed.
            sqlite3.Error: the file could not be read or locked.
        """
        # IMMEDIATE: the version read and the steps it decides on cannot
        # interleave with another process migrating the same file.
        db.execute("BEGIN IMMEDIATE")
        try:
            (version,) = db.execute("PRAGMA user_version").fetchone()
            target = len(_MIGRATIONS)
            if version > target:
                raise StorageError(
                    f"history at {self._path} has schema version {version}, newer than "
                    f"this triochat ({__version__}) knows (up to {target}): it was written "
                    "by a newer triochat. Run that version again, or restore a backup "
                    "taken before the upgrade; the file was not changed"
                )
            try:
                for step in _MIGRATIONS[version:]:
                    for statement in step:
                        db.execute(statement)
            except sqlite3.Error as exc:
                raise StorageError(
                    f"cannot migrate history at {self._path} from schema version {version} "
                    f"to {target}: {exc}; the file was not changed"
                ) from exc
            if version != target:
                # A pragma takes no parameters; target is an int of ours.
                db.execute(f"PRAGMA user_version = {int(target)}")
            epoch = self._epoch_of(db)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return epoch

    def _epoch_of(self, db: sqlite3.Connection) -> str:
        """The store's epoch: the stored one, or a new one for a new store or a
        restored backup. Runs inside `_migrate`'s transaction."""
        rows = dict(
            db.execute("SELECT key, value FROM meta WHERE key IN ('epoch', ?)", (BACKUP_MARK,))
        )
        old = rows.get("epoch")
        if old is not None and BACKUP_MARK not in rows:
            return str(old)
        # A new (or lost) store: a new epoch, so no old id is reused.
        epoch = secrets.token_hex(4)
        while epoch == old:
            epoch = secrets.token_hex(4)
        db.execute("INSERT OR REPLACE INTO meta VALUES ('epoch', ?)", (epoch,))
        if BACKUP_MARK in rows:
            # A backup's first start. The server it was copied from may have
            # handed out ids past the copy's newest; going on from there would
            # give them again to other messages (and a client's `since` would
            # "recover" the wrong ones). So a new epoch, with the kept messages
            # renamed into it: a client that saw the old ids gets
            # `recovered: false`, as after any loss of history.
            db.execute("UPDATE messages SET id = ? || '-' || seq", (epoch,))
            db.execute("DELETE FROM meta WHERE key = ?", (BACKUP_MARK,))
            LOGGER.info(
                "history at %s is a backup taken %s: new epoch %s (was %s)",
                self._path,
                rows[BACKUP_MARK],
                epoch,
                old,
            )
        return epoch

    async def append(self, batch: Sequence[Message]) -> None:
        await trio.to_thread.run_sync(self._append, batch)

    def _append(self, batch: Sequence[Message]) -> None:
        db = self._db
        if db is None:
            raise StorageError("history is closed")
        rows = [(seq_of(self._epoch, m.id), m.room, m.id, m.name, m.msg, m.ts) for m in batch]
        stored = self.stored_bytes + sum(message_bytes(m) for m in batch)
        trimmed = 0
        try:
            with self._lock:
                db.execute("BEGIN IMMEDIATE")
                try:
                    db.executemany("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?)", rows)
                    for room in {m.room for m in batch}:
                        stored -= sum(n for (n,) in db.execute(_TRIM, (room, self._size - 1)))
                    while self._max_bytes and stored > self._max_bytes:
                        stored, count = self._trim_oldest(db, stored)
                        if not count:
                            break
                        trimmed += count
                    db.execute("COMMIT")
                    self.stored_bytes = stored
                    self.trimmed += trimmed
                except BaseException:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise
        except sqlite3.Error as exc:
            raise StorageError(f"history write failed: {exc}") from exc

    def _trim_oldest(self, db: sqlite3.Connection, stored: int) -> tuple[int, int]:
        """Delete the oldest messages of any room until ``stored`` is within the
        bound (or 64 are gone); what is stored then, and how many went."""
        last, count = 0, 0
        for seq, size in db.execute(_OLDEST).fetchall():
            if stored <= self._max_bytes:
                break
            last, count, stored = seq, count + 1, stored - size
        if count:
            db.execute("DELETE FROM messages WHERE seq <= ?", (last,))
        return stored, count

    async def delete(self, room: str, message_id: str) -> bool:
        return await trio.to_thread.run_sync(self._delete, room, message_id)

    def _delete(self, room: str, message_id: str) -> bool:
        db = self._db
        if db is None:
            raise StorageError("history is closed")
        try:
            with self._lock:
                gone = db.execute(
                    f"DELETE FROM messages WHERE room = ? AND id = ? RETURNING {_BYTES}",
                    (room, message_id),
                ).fetchall()
                self.stored_bytes -= sum(n for (n,) in gone)
        except sqlite3.Error as exc:
            raise StorageError(f"history delete failed: {exc}") from exc
        return bool(gone)

    async def aclose(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            await trio.to_thread.run_sync(db.close)
