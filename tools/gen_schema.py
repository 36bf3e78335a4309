"""Write the JSON Schema of every client and server frame (docs/protocol.schema.json).

Generated from the msgspec structs of `triochat.protocol`, so it cannot drift
from the code: tests/test_schema.py regenerates it and compares. Run after
changing a frame::

    python tools/gen_schema.py > docs/protocol.schema.json

The schema states the shapes (fields, types, the ``type`` tag); the rules a
shape cannot say (name and room syntax, lengths, limits) are in
docs/protocol.md, which the descriptions point to.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import msgspec

from triochat.protocol import ClassicFrame, ServerFrame, TypedClientFrame


def frames_schema() -> dict[str, Any]:
    """The schema document: ``client_frame`` and ``server_frame`` under ``$defs``."""
    # The classic {name, msg} frame has no ``type`` tag: a union of its own.
    (typed, classic, server), components = msgspec.json.schema_components(
        (TypedClientFrame, ClassicFrame, ServerFrame), ref_template="#/$defs/{name}"
    )
    client = {"anyOf": [typed, classic]}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://github.com/triochat/triochat/docs/protocol.schema.json",
        "title": "triochat wire protocol, version 1: every frame",
        "description": (
            "Each WebSocket text message (or SSE data line, or POST body) is one frame. "
            "Rules beyond the shapes (names, rooms, lengths, limits): docs/protocol.md."
        ),
        "$defs": {
            **components,
            "client_frame": {"description": "A frame a client sends (§3).", **client},
            "server_frame": {"description": "A frame the server sends (§4).", **server},
        },
        "oneOf": [{"$ref": "#/$defs/client_frame"}, {"$ref": "#/$defs/server_frame"}],
    }


def render() -> str:
    return json.dumps(frames_schema(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
