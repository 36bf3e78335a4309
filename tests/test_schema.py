"""docs/protocol.schema.json is generated from the frames' structs and must match
them (#14 §4): regenerate with ``python tools/gen_schema.py > docs/protocol.schema.json``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import msgspec

from triochat.protocol import JoinedFrame, Say, decode_client_frame, encode

REPO = Path(__file__).resolve().parent.parent
SCHEMA = REPO / "docs" / "protocol.schema.json"


def test_committed_schema_matches_the_code() -> None:
    generated = subprocess.run(
        [sys.executable, str(REPO / "tools" / "gen_schema.py")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert SCHEMA.read_text() == generated, (
        "docs/protocol.schema.json is stale: python tools/gen_schema.py > docs/protocol.schema.json"
    )


def test_schema_names_every_frame_and_its_tag() -> None:
    schema = json.loads(SCHEMA.read_text())
    defs = schema["$defs"]
    tags = {
        name: definition["properties"]["type"]["enum"][0]
        for name, definition in defs.items()
        if "type" in definition.get("properties", {})
    }
    assert tags["Say"] == "say"
    assert tags["JoinedFrame"] == "joined"
    for tag in ("join", "say", "leave", "typing", "whisper", "history"):
        assert tag in tags.values(), tag
    for tag in ("message", "joined", "ack", "presence", "left", "error"):
        assert tag in tags.values(), tag
    assert set(defs["Join"]["required"]) == {"room", "type"}
    assert "rotate" in defs["Join"]["properties"]


def test_frames_the_code_makes_fit_the_schema_shapes() -> None:
    """A round trip through the structs the schema is made of (a spot check that the
    schema describes what goes on the wire, not a second copy of it)."""
    joined = JoinedFrame("lobby", "alice", "t", ["alice"], [], True, "r1")
    wire = json.loads(encode(joined))
    required = json.loads(SCHEMA.read_text())["$defs"]["JoinedFrame"]["required"]
    assert set(required) <= set(wire)
    say = decode_client_frame('{"type":"say","room":"lobby","msg":"hi"}', max_msg_chars=10)
    assert isinstance(say, Say)
    assert msgspec.json.decode(msgspec.json.encode(say)) == {
        "type": "say",
        "room": "lobby",
        "msg": "hi",
        "ref": None,
    }
