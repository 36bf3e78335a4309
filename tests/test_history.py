"""One conformance suite over every History store (memory, SQLite), plus SQLite's own duties."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from triochat.errors import StorageError
from triochat.history import History, Snapshot
from triochat.history import sqlite as sqlite_history
from triochat.history.memory import MemoryHistory
from triochat.history.sqlite import BACKUP_MARK, DB_FILE, SCHEMA_VERSION, SqliteHistory
from triochat.protocol import Message, make_id
from triochat.recent import message_bytes

from .faults import FaultyMemoryHistory


def msg(epoch: str, seq: int, room: str = "lobby") -> Message:
    return Message(room, make_id(epoch, seq), "alice", f"m{seq}", 1_795_800_000_000 + seq)


def seqs(messages: list[Message]) -> list[int]:
    return [int(m.id.rpartition("-")[2]) for m in messages]


class Stores:
    """Opens stores of one kind, and reopens them as a restart of the server would."""

    def __init__(self, kind: str, data_dir: Path) -> None:
        self.kind = kind
        self.data_dir = data_dir
        self.opened: list[History] = []

    def new(self, history_size: int = 1000, *, max_bytes: int = 0) -> History:
        store: History
        if self.kind == "memory":
            store = MemoryHistory(history_size, max_bytes=max_bytes)
        else:
            store = SqliteHistory(self.data_dir, history_size, max_bytes=max_bytes)
        self.opened.append(store)
        return store

    async def open(
        self, history_size: int = 1000, *, max_bytes: int = 0
    ) -> tuple[History, Snapshot]:
        store = self.new(history_size, max_bytes=max_bytes)
        return store, await store.load()

    async def reload(self, store: History, history_size: int = 1000) -> tuple[History, Snapshot]:
        """What a store holds when read again: the same instance in memory, a new one on disk."""
        if self.kind == "memory":
            return store, await store.load()
        await store.aclose()
        return await self.open(history_size)


@pytest.fixture(params=["memory", "sqlite"])
async def stores(request, tmp_path) -> AsyncIterator[Stores]:
    stores = Stores(request.param, tmp_path / "data")
    yield stores
    for store in stores.opened:
        await store.aclose()


@pytest.fixture
async def sqlite_stores(tmp_path) -> AsyncIterator[Stores]:
    stores = Stores("sqlite", tmp_path / "data")
    yield stores
    for store in stores.opened:
        await store.aclose()


# --- the conformance suite --------------------------------------------------------------------


async def test_history_recent_reads_one_room_newest_first_trimmed(stores):
    """`recent` (a join of a room not in memory, docs/protocol.md §8): the newest
    ``history_size`` messages of that room, oldest first; an unknown room is empty."""
    store, snapshot = await stores.open(history_size=3)
    epoch = snapshot.epoch
    await store.append([msg(epoch, seq, "a" if seq % 2 else "b") for seq in range(1, 11)])
    assert seqs(await store.recent("a")) == [5, 7, 9]
    assert seqs(await store.recent("b")) == [6, 8, 10]
    assert await store.recent("nobody-here") == []


async def test_history_stored_bytes_bound_drops_the_oldest_of_any_room(stores):
    """Past ``max_bytes`` (``--max-stored-bytes``) the oldest messages of any room go,
    counted by `message_bytes`, and the store says how many; what is kept adds up."""
    limit = 10 * message_bytes(msg("e" * 8, 10, "a"))  # (epochs are 8 hex digits)
    store, snapshot = await stores.open(max_bytes=limit)
    epoch = snapshot.epoch
    for seq in range(1, 31):
        await store.append([msg(epoch, seq, "a" if seq % 3 else "b")])
    kept_a, kept_b = await store.recent("a"), await store.recent("b")
    assert sorted(seqs(kept_a) + seqs(kept_b)) == list(range(21, 31))
    assert store.stored_bytes == sum(message_bytes(m) for m in kept_a + kept_b) <= limit
    assert store.trimmed == 20
    assert await store.delete("a", kept_a[0].id)
    assert store.stored_bytes == sum(message_bytes(m) for m in kept_a[1:] + kept_b)


async def test_history_stored_bytes_counts_trimming_per_room(stores):
    """The per-room trim (``--history-size``) is subtracted too: no bound is reached."""
    store, snapshot = await stores.open(history_size=2, max_bytes=1 << 20)
    epoch = snapshot.epoch
    await store.append([msg(epoch, seq) for seq in range(1, 6)])
    kept = await store.recent("lobby")
    assert seqs(kept) == [4, 5]
    assert store.stored_bytes == sum(message_bytes(m) for m in kept)
    assert store.trimmed == 0


async def test_history_load_empty(stores):
    """An empty store has a non-empty epoch, next_seq 1 and no rooms."""
    _, snapshot = await stores.open()
    assert isinstance(snapshot.epoch, str)
    assert snapshot.epoch
    assert snapshot.next_seq == 1
    assert snapshot.rooms == {}


async def test_history_append_then_reload_in_order_per_room(stores):
    """Appended messages come back per room, oldest first, under the same epoch."""
    store, snapshot = await stores.open()
    epoch = snapshot.epoch
    batch1 = [msg(epoch, 1), msg(epoch, 2, "dev"), msg(epoch, 3)]
    batch2 = [msg(epoch, 4, "dev"), msg(epoch, 5)]
    await store.append(batch1)
    await store.append(batch2)
    _, reloaded = await stores.reload(store)
    assert reloaded.epoch == epoch
    assert reloaded.rooms == {
        "lobby": [batch1[0], batch1[2], batch2[1]],
        "dev": [batch1[1], batch2[0]],
    }


async def test_history_trimming_keeps_newest_per_room(stores):
    """Each room keeps only its newest history_size messages; other rooms are untouched."""
    store, snapshot = await stores.open(history_size=3)
    epoch = snapshot.epoch
    await store.append([msg(epoch, 1), msg(epoch, 2), msg(epoch, 3, "dev")])
    await store.append([msg(epoch, 4), msg(epoch, 5)])
    await store.append([msg(epoch, 6)])
    _, reloaded = await stores.reload(store, history_size=3)
    assert seqs(reloaded.rooms["lobby"]) == [4, 5, 6]
    assert seqs(reloaded.rooms["dev"]) == [3]


async def test_history_trimming_within_one_batch(stores):
    """A single batch larger than history_size keeps its newest history_size messages."""
    store, snapshot = await stores.open(history_size=2)
    epoch = snapshot.epoch
    await store.append([msg(epoch, seq) for seq in range(1, 8)])
    _, reloaded = await stores.reload(store, history_size=2)
    assert seqs(reloaded.rooms["lobby"]) == [6, 7]


async def test_history_append_empty_batch(stores):
    """An empty batch stores nothing and fails nothing."""
    store, _ = await stores.open()
    await store.append([])
    _, reloaded = await stores.reload(store)
    assert reloaded.rooms == {}


async def test_history_round_trips_unicode(stores):
    """Names and texts with any Unicode come back exactly."""
    store, snapshot = await stores.open()
    message = Message("lobby", make_id(snapshot.epoch, 1), "李雷", 'Zoë 😀 "q" \\ \n', 1)
    await store.append([message])
    _, reloaded = await stores.reload(store)
    assert reloaded.rooms == {"lobby": [message]}


async def test_history_aclose_twice_is_safe(stores):
    """aclose may be called twice."""
    store, _ = await stores.open()
    await store.aclose()
    await store.aclose()


async def test_history_new_store_new_epoch(stores):
    """Two stores that share no data have different epochs."""
    _, first = await stores.open()
    if stores.kind == "sqlite":
        stores.data_dir = stores.data_dir.with_name("other")
    _, second = await stores.open()
    assert first.epoch != second.epoch


async def test_history_load_again_reads_what_is_stored(stores):
    """`load` on an open store reads it again (a node attaching to a broker later)."""
    store, first = await stores.open(history_size=2)
    await store.append([msg(first.epoch, 1), msg(first.epoch, 2), msg(first.epoch, 3, "dev")])
    await store.append([msg(first.epoch, 4)])
    again = await store.load()
    assert again.epoch == first.epoch
    assert again.next_seq == 5
    assert {room: seqs(kept) for room, kept in again.rooms.items()} == {
        "lobby": [2, 4],
        "dev": [3],
    }


# --- MemoryHistory ------------------------------------------------------------------------


async def test_memory_history_fail_with_raises_storage_error():
    """With fail_with set, append raises StorageError and stores nothing; clearing it recovers."""
    store = FaultyMemoryHistory(10)
    epoch = (await store.load()).epoch
    store.fail_with = "disk on fire"
    with pytest.raises(StorageError, match="disk on fire"):
        await store.append([msg(epoch, 1)])
    assert (await store.load()).rooms == {}
    store.fail_with = None
    await store.append([msg(epoch, 2)])
    assert seqs((await store.load()).rooms["lobby"]) == [2]


# --- SqliteHistory ------------------------------------------------------------------------


async def test_sqlite_history_snapshot_holds_the_most_recently_written_rooms(sqlite_stores):
    """At start a snapshot holds at most ``snapshot_rooms`` rooms, those written last,
    and says it is not complete (the others are read when joined); the stored
    bytes are counted again from the file."""
    store, snapshot = await sqlite_stores.open()
    epoch = snapshot.epoch
    rooms = [f"r{i}" for i in range(5)]
    await store.append([msg(epoch, seq + 1, room) for seq, room in enumerate(rooms)])
    await store.append([msg(epoch, 6, "r0")])  # r0 written last now
    stored = store.stored_bytes
    await store.aclose()
    small = SqliteHistory(sqlite_stores.data_dir, 1000, snapshot_rooms=2)
    sqlite_stores.opened.append(small)
    snapshot = await small.load()
    assert sorted(snapshot.rooms) == ["r0", "r4"]
    assert seqs(snapshot.rooms["r0"]) == [1, 6]
    assert not snapshot.complete
    assert snapshot.next_seq == 7
    assert small.stored_bytes == stored > 0
    assert seqs(await small.recent("r2")) == [3]
    again = SqliteHistory(sqlite_stores.data_dir, 1000, snapshot_rooms=5)
    sqlite_stores.opened.append(again)
    whole = await again.load()
    assert whole.complete
    assert len(whole.rooms) == 5


async def test_sqlite_history_survives_restart(sqlite_stores):
    """A new instance on the same dir has the same epoch, the messages, and next_seq past them."""
    store, snapshot = await sqlite_stores.open()
    epoch = snapshot.epoch
    await store.append([msg(epoch, 1), msg(epoch, 2, "dev")])
    await store.append([msg(epoch, 3)])
    await store.aclose()
    _, reloaded = await sqlite_stores.open()
    assert reloaded.epoch == epoch
    assert reloaded.next_seq == 4
    assert seqs(reloaded.rooms["lobby"]) == [1, 3]
    assert seqs(reloaded.rooms["dev"]) == [2]


async def test_sqlite_history_next_seq_past_trimmed_and_gaps(sqlite_stores):
    """next_seq exceeds every seq ever stored, with trimming and gaps in the numbering."""
    store, snapshot = await sqlite_stores.open(history_size=2)
    epoch = snapshot.epoch
    await store.append([msg(epoch, seq) for seq in (1, 2, 5, 9)])
    await store.append([msg(epoch, 12, "dev")])
    _, reloaded = await sqlite_stores.reload(store, history_size=2)
    assert reloaded.next_seq == 13
    assert seqs(reloaded.rooms["lobby"]) == [5, 9]


async def test_sqlite_history_smaller_size_on_reopen(sqlite_stores):
    """Reopened with a smaller history_size, load returns the newest that many per room."""
    store, snapshot = await sqlite_stores.open(history_size=10)
    epoch = snapshot.epoch
    await store.append([msg(epoch, seq) for seq in range(1, 7)])
    _, reloaded = await sqlite_stores.reload(store, history_size=3)
    assert seqs(reloaded.rooms["lobby"]) == [4, 5, 6]
    assert reloaded.next_seq == 7


async def test_sqlite_history_deleted_file_new_epoch(sqlite_stores):
    """When the database is lost, the next load starts a new epoch (no id is reused)."""
    store, snapshot = await sqlite_stores.open()
    await store.append([msg(snapshot.epoch, 1)])
    await store.aclose()
    for path in sqlite_stores.data_dir.glob(DB_FILE + "*"):
        path.unlink()
    _, reloaded = await sqlite_stores.open()
    assert reloaded.epoch != snapshot.epoch
    assert reloaded.rooms == {}
    assert reloaded.next_seq == 1


async def test_sqlite_history_db_is_directory_storage_error(sqlite_stores):
    """A database path that is a directory fails load with StorageError."""
    (sqlite_stores.data_dir / DB_FILE).mkdir(parents=True)
    with pytest.raises(StorageError):
        await sqlite_stores.new().load()


async def test_sqlite_history_data_dir_is_file_storage_error(sqlite_stores):
    """A data dir that is a regular file fails load with StorageError."""
    sqlite_stores.data_dir.write_bytes(b"")
    with pytest.raises(StorageError):
        await sqlite_stores.new().load()


async def test_sqlite_history_corrupt_db_storage_error(sqlite_stores):
    """A file that is not a database fails load with StorageError."""
    sqlite_stores.data_dir.mkdir(parents=True)
    (sqlite_stores.data_dir / DB_FILE).write_bytes(b"this is not a database, " * 200)
    with pytest.raises(StorageError):
        await sqlite_stores.new().load()


async def test_sqlite_history_locked_db_storage_error_then_recovers(sqlite_stores):
    """While another connection holds an exclusive lock append fails; after release it works."""
    store, snapshot = await sqlite_stores.open()
    epoch = snapshot.epoch
    await store.append([msg(epoch, 1)])
    other = sqlite3.connect(sqlite_stores.data_dir / DB_FILE, timeout=0.1, isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")
        with trio.fail_after(10), pytest.raises(StorageError):
            # Bounded by the store's busy_timeout (2 s), in its worker thread.
            await store.append([msg(epoch, 2)])
        other.execute("ROLLBACK")
    finally:
        other.close()
    await store.append([msg(epoch, 3)])
    _, reloaded = await sqlite_stores.reload(store)
    assert seqs(reloaded.rooms["lobby"]) == [1, 3]


async def test_sqlite_history_failed_batch_stores_nothing(sqlite_stores):
    """A batch that fails part-way is rolled back whole (atomic), and the store still works."""
    store, snapshot = await sqlite_stores.open()
    epoch = snapshot.epoch
    await store.append([msg(epoch, 1)])
    with pytest.raises(StorageError):
        await store.append([msg(epoch, 2), msg(epoch, 1, "dev")])  # seq 1 again
    await store.append([msg(epoch, 3)])
    _, reloaded = await sqlite_stores.reload(store)
    assert reloaded.rooms == {"lobby": [msg(epoch, 1), msg(epoch, 3)]}


async def test_sqlite_history_append_before_load_storage_error(sqlite_stores):
    """append on a store never loaded raises StorageError."""
    with pytest.raises(StorageError):
        await sqlite_stores.new().append([msg("e", 1)])


async def test_sqlite_history_append_after_aclose_storage_error(sqlite_stores):
    """append after aclose raises StorageError."""
    store, snapshot = await sqlite_stores.open()
    await store.aclose()
    with pytest.raises(StorageError):
        await store.append([msg(snapshot.epoch, 1)])


# --- SqliteHistory: schema versions (#11) -------------------------------------------------

# The layout of triochat 0.1.0, exactly as it was created before the schema
# version was kept (user_version 0). Frozen here: it is what files in the
# field hold, whatever the code's own schema becomes.
FIRST_LAYOUT_SQL = """
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


def make_first_layout_file(data_dir: Path, epoch: str, messages: list[Message]) -> Path:
    """A history file as triochat 0.1.0 left it: WAL, user_version 0, those rows."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / DB_FILE
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.executescript(FIRST_LAYOUT_SQL)
        db.execute("INSERT INTO meta VALUES ('epoch', ?)", (epoch,))
        db.executemany(
            "INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?)",
            [(int(m.id.rpartition("-")[2]), m.room, m.id, m.name, m.msg, m.ts) for m in messages],
        )
        assert db.execute("PRAGMA user_version").fetchone() == (0,)
    finally:
        db.close()
    return path


def user_version(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return int(db.execute("PRAGMA user_version").fetchone()[0])
    finally:
        db.close()


async def test_sqlite_history_new_file_is_stamped_with_the_schema_version(sqlite_stores):
    """A new history file carries PRAGMA user_version = SCHEMA_VERSION (1) (#11)."""
    store, _ = await sqlite_stores.open()
    await store.aclose()
    assert SCHEMA_VERSION == 1
    assert user_version(sqlite_stores.data_dir / DB_FILE) == SCHEMA_VERSION


async def test_sqlite_history_unversioned_first_layout_is_kept_and_stamped(sqlite_stores):
    """A 0.1.0 file (user_version 0, today's tables) is version 1: every message and the
    epoch survive, ids go on after them, and the file is stamped 1 (#11)."""
    epoch = "0badc0de"
    old = [msg(epoch, 1), msg(epoch, 2, "dev"), msg(epoch, 3), msg(epoch, 7, "dev"), msg(epoch, 9)]
    path = make_first_layout_file(sqlite_stores.data_dir, epoch, old)
    store, snapshot = await sqlite_stores.open()
    assert snapshot.epoch == epoch
    assert snapshot.next_seq == 10
    assert snapshot.rooms == {"lobby": [old[0], old[2], old[4]], "dev": [old[1], old[3]]}
    await store.append([msg(epoch, 10)])
    await store.aclose()
    assert user_version(path) == SCHEMA_VERSION
    _, reloaded = await sqlite_stores.open()
    assert seqs(reloaded.rooms["lobby"]) == [1, 3, 9, 10]


async def test_sqlite_history_newer_schema_is_refused_untouched(sqlite_stores):
    """A file whose version is newer than the code knows fails load with a StorageError
    naming both versions, and the file is left byte for byte as it was (#11)."""
    path = make_first_layout_file(sqlite_stores.data_dir, "0badc0de", [msg("0badc0de", 1)])
    db = sqlite3.connect(path, isolation_level=None)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.execute("PRAGMA journal_mode = DELETE")  # everything in the one file, to compare
    db.close()
    before = path.read_bytes()
    with pytest.raises(StorageError, match=r"schema version 2, newer than this triochat") as info:
        await sqlite_stores.new().load()
    assert "up to 1" in str(info.value)
    assert path.read_bytes() == before
    assert user_version(path) == SCHEMA_VERSION + 1


async def test_sqlite_history_migration_runs_in_one_transaction(sqlite_stores, monkeypatch):
    """A later step that fails leaves the file at its old version with nothing of the
    step applied; a good step then migrates it forward, data intact (#11)."""
    epoch = "0badc0de"
    path = make_first_layout_file(sqlite_stores.data_dir, epoch, [msg(epoch, 1), msg(epoch, 2)])
    store, _ = await sqlite_stores.open()  # stamps version 1
    await store.aclose()
    first = sqlite_history._MIGRATIONS[0]
    broken = ("CREATE TABLE extra (x)", "INSERT INTO no_such_table VALUES (1)")
    monkeypatch.setattr(sqlite_history, "_MIGRATIONS", (first, broken))
    with pytest.raises(StorageError, match="from schema version 1 to 2: no such table"):
        await sqlite_stores.new().load()
    assert user_version(path) == 1
    db = sqlite3.connect(path)
    tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master")}
    db.close()
    assert "extra" not in tables
    good = ("CREATE TABLE extra (x)", "CREATE INDEX extra_x ON extra (x)")
    monkeypatch.setattr(sqlite_history, "_MIGRATIONS", (first, good))
    _, snapshot = await sqlite_stores.open()
    assert snapshot.epoch == epoch
    assert seqs(snapshot.rooms["lobby"]) == [1, 2]
    assert user_version(path) == 2


async def test_sqlite_history_backup_starts_a_new_epoch_once(sqlite_stores):
    """A file marked as a backup (by `triochat backup`) starts a new epoch on its first
    load, its messages renamed into it in order, so no id the source server gave out
    after the copy is reused; later loads keep that epoch (#11)."""
    store, snapshot = await sqlite_stores.open()
    old_epoch = snapshot.epoch
    await store.append([msg(old_epoch, 1), msg(old_epoch, 2, "dev"), msg(old_epoch, 3)])
    await store.aclose()
    path = sqlite_stores.data_dir / DB_FILE
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("INSERT INTO meta VALUES (?, '2026-12-01T00:00:00+00:00')", (BACKUP_MARK,))
    db.close()
    store, restored = await sqlite_stores.open()
    epoch = restored.epoch
    assert epoch != old_epoch
    assert restored.next_seq == 4
    assert restored.rooms == {
        "lobby": [msg(epoch, 1), msg(epoch, 3)],
        "dev": [msg(epoch, 2, "dev")],
    }
    await store.append([msg(epoch, 4)])
    _, again = await sqlite_stores.reload(store)
    assert again.epoch == epoch
    assert seqs(again.rooms["lobby"]) == [1, 3, 4]
