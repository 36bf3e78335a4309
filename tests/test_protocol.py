"""The sans-I/O wire protocol (docs/protocol.md §2-4): decoding, identifiers, ids, encoding."""

from __future__ import annotations

import json
import subprocess
import sys
import unicodedata

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from websockets.frames import Opcode
from websockets.protocol import Protocol, Side, State

from triochat.errors import ClientProtocolError
from triochat.frames import OutFrame, websocket_text_frame
from triochat.protocol import (
    ClassicFrame,
    ErrorFrame,
    HistoryRequest,
    Join,
    Leave,
    Message,
    Say,
    Typing,
    Whisper,
    WhisperFrame,
    confusable_key,
    decode_client_frame,
    encode,
    is_valid_room,
    make_id,
    name_key,
    normalize_name,
    seq_of,
    skeleton,
)

MAX_MSG = 2000
DECODE_CODES = {"bad_json", "bad_frame", "too_long"}


def decode(frame: object) -> object:
    """Decode ``frame`` sent as JSON text (a `Raw` is sent as it is)."""
    text = frame.text if isinstance(frame, Raw) else json.dumps(frame)
    return decode_client_frame(text, max_msg_chars=MAX_MSG)


def refused(frame: object) -> ClientProtocolError:
    """The error decoding ``frame`` raises (fails when it decodes)."""
    with pytest.raises(ClientProtocolError) as info:
        decode(frame)
    return info.value


class Raw:
    """Client text sent verbatim, not JSON-encoded (e.g. malformed JSON)."""

    def __init__(self, text: str | bytes) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"Raw({self.text!r})"


# --- decoding every client frame ------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        (
            {"type": "join", "room": "lobby", "name": "alice", "since": "e-41", "token": "t"},
            Join(room="lobby", name="alice", since="e-41", token="t"),
        ),
        ({"type": "join", "room": "lobby"}, Join(room="lobby")),
        (
            {"type": "say", "room": "lobby", "msg": "hello", "ref": "c-17"},
            Say(room="lobby", msg="hello", ref="c-17"),
        ),
        ({"type": "say", "room": "lobby", "msg": "hello"}, Say(room="lobby", msg="hello")),
        ({"type": "leave", "room": "lobby"}, Leave(room="lobby")),
        ({"type": "typing", "room": "lobby"}, Typing(room="lobby")),
        (
            {"type": "whisper", "to": "bob", "msg": "psst", "ref": "c-18"},
            Whisper(to="bob", msg="psst", ref="c-18"),
        ),
        (
            {"type": "history", "room": "lobby", "before": "e-41", "limit": 50},
            HistoryRequest(room="lobby", before="e-41", limit=50),
        ),
        ({"type": "history", "room": "lobby"}, HistoryRequest(room="lobby", limit=50)),
        ({"name": "alice", "msg": "hi"}, ClassicFrame(name="alice", msg="hi")),
        ({"type": "join", "room": "lobby", "name": None}, Join(room="lobby")),
    ],
)
def test_decode_client_frame_every_type(frame, expected):
    """Each client frame of §3 decodes to its typed struct (optional fields default)."""
    assert decode(frame) == expected


def test_decode_client_frame_accepts_bytes():
    """A UTF-8 payload given as bytes decodes like the text."""
    frame = decode_client_frame(
        '{"type":"say","room":"r","msg":"Zoë"}'.encode(), max_msg_chars=MAX_MSG
    )
    assert frame == Say(room="r", msg="Zoë")


def test_decode_client_frame_ignores_unknown_fields():
    """Unknown extra fields are ignored, on typed and on classic frames."""
    assert decode({"type": "say", "room": "r", "msg": "m", "color": "red", "x": [1]}) == Say(
        room="r", msg="m"
    )
    assert decode({"name": "a", "msg": "m", "avatar": None}) == ClassicFrame(name="a", msg="m")


def test_decode_client_frame_history_limit_bounds():
    """`limit` 1 and 200 are accepted."""
    assert decode({"type": "history", "room": "r", "limit": 1}).limit == 1
    assert decode({"type": "history", "room": "r", "limit": 200}).limit == 200


def test_decode_client_frame_ref_bounds():
    """A `ref` of 1 and of 64 characters is accepted."""
    assert decode({"type": "leave", "room": "r", "ref": "x"}).ref == "x"
    assert decode({"type": "leave", "room": "r", "ref": "x" * 64}).ref == "x" * 64


def test_decode_client_frame_msg_length_counts_code_points():
    """`msg` may hold max_msg_chars code points, however many UTF-8 bytes they take."""
    assert decode({"type": "say", "room": "r", "msg": "😀" * MAX_MSG}).msg == "😀" * MAX_MSG
    assert refused({"type": "say", "room": "r", "msg": "😀" * (MAX_MSG + 1)}).code == "too_long"


# --- every error decoding can raise --------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["", "not json", "{", '{"type": "say"', "{'type': 'say'}", "[1, 2", '{"a": 1,}', b"\xff"],
)
def test_decode_client_frame_bad_json(text):
    """Text that is not JSON is refused with `bad_json`."""
    assert refused(Raw(text)).code == "bad_json"


@pytest.mark.parametrize(
    "frame",
    [
        [],
        [1, 2],
        "hello",
        42,
        None,
        True,
        {},
        {"room": "lobby"},
        {"type": "shout", "room": "lobby"},
        {"type": None, "room": "lobby"},
        {"type": 5, "room": "lobby"},
        {"type": "say", "room": "lobby"},
        {"type": "say", "msg": "hi"},
        {"type": "say", "room": 5, "msg": "hi"},
        {"type": "say", "room": "lobby", "msg": 5},
        {"type": "say", "room": "lobby", "msg": None},
        {"type": "say", "room": "lobby", "msg": ["hi"]},
        {"type": "join", "room": "lobby", "name": 5},
        {"type": "join", "room": "lobby", "name": "a", "since": 41},
        {"type": "join", "room": "lobby", "name": "a", "token": 1},
        {"type": "whisper", "msg": "psst"},
        {"type": "whisper", "to": ["bob"], "msg": "psst"},
        {"type": "history", "room": "lobby", "limit": "50"},
        {"type": "history", "room": "lobby", "limit": 1.5},
        {"type": "history", "room": "lobby", "limit": True},
        {"type": "history", "room": "lobby", "before": 41},
        {"type": "say", "room": "lobby", "msg": ""},
        {"type": "whisper", "to": "bob", "msg": ""},
        {"type": "say", "room": "lobby", "msg": "hi", "ref": ""},
        {"type": "say", "room": "lobby", "msg": "hi", "ref": "x" * 65},
        {"type": "say", "room": "lobby", "msg": "hi", "ref": 17},
        {"type": "history", "room": "lobby", "limit": 0},
        {"type": "history", "room": "lobby", "limit": 201},
        {"type": "history", "room": "lobby", "limit": -1},
        {"name": "alice"},
        {"msg": "hi"},
        {"name": 5, "msg": "hi"},
        {"name": "alice", "msg": 5},
        {"name": "alice", "msg": ""},
        {"name": "alice", "msg": "hi", "type": "classic"},
    ],
    ids=repr,
)
def test_decode_client_frame_bad_frame(frame):
    """JSON that is not a valid frame is refused with `bad_frame`."""
    assert refused(frame).code == "bad_frame"


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "say", "room": "lobby", "msg": "x" * (MAX_MSG + 1)},
        {"type": "whisper", "to": "bob", "msg": "x" * (MAX_MSG + 1)},
        {"name": "alice", "msg": "x" * (MAX_MSG + 1)},
    ],
    ids=["say", "whisper", "classic"],
)
def test_decode_client_frame_too_long(frame):
    """A `msg` over max_msg_chars is refused with `too_long` (say, whisper, classic)."""
    assert refused(frame).code == "too_long"


def test_decode_client_frame_max_msg_chars_is_configurable():
    """The `too_long` bound is the max_msg_chars argument."""
    text = json.dumps({"type": "say", "room": "r", "msg": "abcd"})
    assert decode_client_frame(text, max_msg_chars=4).msg == "abcd"
    with pytest.raises(ClientProtocolError) as info:
        decode_client_frame(text, max_msg_chars=3)
    assert info.value.code == "too_long"


def test_decode_client_frame_bad_ref_beats_too_long():
    """A frame with an over-long `msg` and a bad `ref` is `bad_frame` (checked first)."""
    error = refused({"type": "say", "room": "r", "msg": "x" * (MAX_MSG + 1), "ref": ""})
    assert error.code == "bad_frame"
    error = refused({"type": "say", "room": "r", "msg": "x" * (MAX_MSG + 1), "ref": "y" * 65})
    assert error.code == "bad_frame"


def test_decode_client_frame_wrong_type_beats_too_long():
    """A wrongly typed field beats an over-long `msg`: `bad_frame`."""
    error = refused({"type": "say", "room": 1, "msg": "x" * (MAX_MSG + 1)})
    assert error.code == "bad_frame"


def test_decode_client_frame_empty_msg_is_bad_frame_not_too_long():
    """An empty `msg` is `bad_frame` even with max_msg_chars 0."""
    with pytest.raises(ClientProtocolError) as info:
        decode_client_frame('{"type":"say","room":"r","msg":""}', max_msg_chars=0)
    assert info.value.code == "bad_frame"


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ({"type": "say", "room": "r", "msg": "x" * (MAX_MSG + 1), "ref": "c-1"}, "too_long"),
        ({"type": "say", "room": "r", "msg": "", "ref": "c-1"}, "bad_frame"),
        ({"type": "say", "room": 5, "msg": "hi", "ref": "c-1"}, "bad_frame"),
        ({"type": "shout", "ref": "c-1"}, "bad_frame"),
        ({"ref": "c-1"}, "bad_frame"),
        ({"type": "history", "room": "r", "limit": 0, "ref": "c-1"}, "bad_frame"),
        ({"type": "history", "room": "r", "limit": 201, "ref": "c-1"}, "bad_frame"),
        ({"name": 5, "msg": "hi", "ref": "c-1"}, "bad_frame"),
        ({"name": "a", "msg": "x" * (MAX_MSG + 1), "ref": "c-1"}, "too_long"),
    ],
    ids=repr,
)
def test_decode_client_frame_echoes_usable_ref(frame, code):
    """An error for a frame with a usable `ref` carries that `ref`."""
    error = refused(frame)
    assert (error.code, error.ref) == (code, "c-1")


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "say", "room": "r", "msg": "hi", "ref": ""},
        {"type": "say", "room": "r", "msg": "hi", "ref": "x" * 65},
        {"type": "say", "room": 5, "msg": "hi", "ref": 17},
        {"type": "shout", "ref": ""},
        Raw('{"type": "say", "ref": "c-1"'),
        ["c-1"],
    ],
    ids=repr,
)
def test_decode_client_frame_no_ref_when_unusable(frame):
    """An error for a frame without a usable `ref` carries none."""
    assert refused(frame).ref is None


# --- never any other exception ----------------------------------------------------

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=20,
)
FIELD_VALUES = (
    st.none()
    | st.booleans()
    | st.integers(-300, 300)
    | st.text(max_size=70)
    | st.sampled_from(["lobby", "alice", "x" * 64, "x" * 65, "", "x" * 2001])
    | st.lists(st.integers(), max_size=2)
)
FRAME_LIKE = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(
            ["join", "say", "leave", "typing", "whisper", "history", "shout", ""]
        )
        | FIELD_VALUES,
        "room": FIELD_VALUES,
        "name": FIELD_VALUES,
        "msg": FIELD_VALUES,
        "to": FIELD_VALUES,
        "ref": FIELD_VALUES,
        "since": FIELD_VALUES,
        "token": FIELD_VALUES,
        "before": FIELD_VALUES,
        "limit": FIELD_VALUES,
    },
)


def check_decode_never_crashes(text: str | bytes) -> None:
    error: ClientProtocolError | None = None
    try:
        frame = decode_client_frame(text, max_msg_chars=MAX_MSG)
    except ClientProtocolError as exc:
        error = exc
    if error is not None:
        assert error.code in DECODE_CODES
        assert error.ref is None or 1 <= len(error.ref) <= 64
    else:
        assert isinstance(
            frame, Join | Say | Leave | Typing | Whisper | HistoryRequest | ClassicFrame
        )


@settings(derandomize=True, database=None, max_examples=500)
@given(st.text())
@example("[")
@example("[1, {")
@example("1 2")
@example('"x" junk')
@example('{"type": "bogus", ')
@example('{"type": 5, ]')
def test_decode_client_frame_any_text_is_frame_or_protocol_error(text):
    """Arbitrary text decodes to a frame or raises ClientProtocolError, nothing else."""
    check_decode_never_crashes(text)


@settings(derandomize=True, database=None, max_examples=300)
@given(st.binary())
@example(b"[\xff")
def test_decode_client_frame_any_bytes_is_frame_or_protocol_error(data):
    """Arbitrary bytes decode to a frame or raise ClientProtocolError, nothing else."""
    check_decode_never_crashes(data)


@settings(derandomize=True, database=None, max_examples=500)
@given(JSON_VALUES)
def test_decode_client_frame_any_json_is_frame_or_protocol_error(value):
    """Any JSON value decodes to a frame or raises ClientProtocolError, nothing else."""
    check_decode_never_crashes(json.dumps(value))


@settings(derandomize=True, database=None, max_examples=1000)
@given(FRAME_LIKE)
def test_decode_client_frame_any_frame_like_object_is_frame_or_protocol_error(value):
    """Frame-shaped objects with arbitrary field values never raise anything else."""
    check_decode_never_crashes(json.dumps(value))


def test_decode_client_frame_lone_surrogate_is_bad_json():
    """A str holding a lone surrogate (not UTF-8 encodable) is `bad_json`, not a crash."""
    assert refused(Raw('{"type":"say","room":"r","msg":"\ud800"}')).code == "bad_json"
    assert refused(Raw('["\ud800"')).code == "bad_json"


def test_decode_client_frame_deep_nesting_is_protocol_error():
    """JSON nested deeper than the interpreter's stack is refused, never a crash."""
    for text in ("[" * 60000 + "]" * 60000, '{"a":' * 12000 + "1" + "}" * 12000):
        error = refused(Raw(text))
        assert error.code in {"bad_json", "bad_frame"}


# --- identifiers ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "bound"),
    [
        ("alice", "alice"),
        ("  alice  ", "alice"),
        ("\talice\n", "alice"),
        ("\u3000alice\u3000", "alice"),
        ("\u00a0bob\u2003", "bob"),
        ("Zoë", "Zoë"),
        ("李雷", "李雷"),
        ("Ōsaka Ünïcode", "Ōsaka Ünïcode"),
        ("alice smith", "alice smith"),
        ("a", "a"),
        ("x" * 32, "x" * 32),
        ("  " + "x" * 32 + "  ", "x" * 32),
        ("😀" * 32, "😀" * 32),
    ],
)
def test_normalize_name_accepts(raw, bound):
    """Valid names are trimmed of Unicode white space and returned."""
    assert normalize_name(raw) == bound


@pytest.mark.parametrize(
    "raw",
    [
        "",
        " ",
        "\u3000\u3000",
        "x" * 33,
        "😀" * 33,
        "\u200bbob",
        "bob\u200b",
        "a\u202eb",
        "a\u2028b",
        "a\u2029b",
        "\x07",
        "a\x00b",
        "a\x7fb",
        "a\u00adb",
        "a\ufeffb",
        "a\u2066b",
    ],
    ids=repr,
)
def test_normalize_name_refuses(raw):
    """Empty, over-long, control, format and line/paragraph separator names are refused."""
    assert normalize_name(raw) is None


def test_normalize_name_ascii_by_the_general_rule():
    """Every ASCII character inside a name is judged as the category rules say
    (the printable-ASCII shortcut agrees with them): controls refused, the rest kept."""
    for point in range(128):
        char = chr(point)
        allowed = unicodedata.category(char) not in {"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"}
        assert (normalize_name(f"a{char}b") == f"a{char}b") is allowed, hex(point)
        if allowed and not char.isspace():
            assert normalize_name(char) == char, hex(point)


# --- name rules of #18: invisible, private, unassigned, reserved; keys -----------------

INVISIBLE_EXAMPLES = [
    "\u034f",  # combining grapheme joiner
    "\u115f",  # Hangul choseong filler
    "\u1160",  # Hangul jungseong filler
    "\u3164",  # Hangul filler
    "\uffa0",  # halfwidth Hangul filler
    "\ufe00",  # variation selector-1
    "\ufe0f",  # variation selector-16
    "\U000e0100",  # variation selector-17
    "\U000e01ef",  # variation selector-256
    "\u180b",  # Mongolian free variation selector one
    "\u180e",  # Mongolian vowel separator
    "\u180f",  # Mongolian free variation selector four
    "\u200b",  # zero width space
    "\u200c",  # zero width non-joiner
    "\u200d",  # zero width joiner
    "\u200e",  # left-to-right mark
    "\u200f",  # right-to-left mark
    "\u2060",  # word joiner
    "\u2064",  # invisible plus
    "\u206f",  # nominal digit shapes
    "\ufeff",  # zero width no-break space
    "\u00ad",  # soft hyphen
    "\u061c",  # Arabic letter mark
    "\u17b4",  # Khmer vowel inherent aq
    "\U0001bca0",  # shorthand format letter overlap
    "\U0001d173",  # musical symbol begin beam
    "\U000e0000",  # (reserved, default ignorable)
    "\U000e0001",  # language tag
    "\U000e0041",  # tag latin capital letter a
    "\U000e0fff",  # (reserved, default ignorable)
    "\u2800",  # braille pattern blank
]
PRIVATE_USE_EXAMPLES = ["\ue000", "\uf8ff", "\U000f0000", "\U000ffffd", "\U00100000", "\U0010fffd"]
UNASSIGNED_EXAMPLES = [
    "\u0378",  # unassigned in the Greek block
    "\ufdd0",  # noncharacters U+FDD0-FDEF
    "\ufdef",
    "\ufffe",  # noncharacters U+xFFFE/xFFFF
    "\uffff",
    "\U0001fffe",
    "\U0010ffff",
    "\U000e0080",  # unassigned (and default ignorable)
]


@pytest.mark.parametrize(
    "char", INVISIBLE_EXAMPLES + PRIVATE_USE_EXAMPLES + UNASSIGNED_EXAMPLES, ids=repr
)
@pytest.mark.parametrize("where", ["alone", "inside", "before", "after"])
def test_normalize_name_refuses_invisible_private_and_unassigned(char, where):
    """Default-ignorable, blank, private-use, unassigned and noncharacter code points are refused anywhere in a name (#18)."""
    raw = {
        "alone": char,
        "inside": f"ali{char}ce",
        "before": f"{char}alice",
        "after": f"alice{char}",
    }
    assert normalize_name(raw[where]) is None


def test_normalize_name_refuses_surrogates():
    """A lone surrogate (only a Python caller can pass one: JSON text is UTF-8) is refused (#18)."""
    assert normalize_name("a\ud800b") is None
    assert normalize_name("\udfff") is None


@pytest.mark.parametrize(
    "raw",
    ["\u0301", "\u0301\u0308", "\u0301 \u0308", "\u20dd", "\u0903\u0903", " \u0301 "],
    ids=repr,
)
def test_normalize_name_refuses_only_marks_and_spaces(raw):
    """A name of combining marks and spaces alone renders as nothing: refused (#18)."""
    assert normalize_name(raw) is None


@pytest.mark.parametrize(
    "raw",
    [
        "server",
        "system",
        "Server",
        "SYSTEM",
        " server ",
        "\uff53\uff45\uff52\uff56\uff45\uff52",  # fullwidth
        "\u0455ystem",  # Cyrillic dze for s
        "s\u0443stem",  # Cyrillic u for y
        "s\u0435rv\u0435r",  # Cyrillic ie for e
        "systern",  # TR39: "m" looks like "rn"
        "\u0405YSTEM",  # Cyrillic capital dze
    ],
    ids=repr,
)
def test_normalize_name_refuses_reserved_names_and_look_alikes(raw):
    """The reserved names "server" and "system", or any name with their name key or skeleton, are refused (#18)."""
    assert normalize_name(raw) is None


@pytest.mark.parametrize(
    ("raw", "bound"),
    [
        ("e\u0301", "e\u0301"),  # a letter with a combining mark
        ("servers", "servers"),
        ("my server", "my server"),
        ("sys", "sys"),
        ("\ud55c\uad6d", "\ud55c\uad6d"),  # Hangul syllables, not fillers
        ("alice\u00a0", "alice"),  # NBSP is white space: trimmed
        ("ali\u00a0ce", "ali\u00a0ce"),  # inside, it stays (and folds to a space)
        ("\u2603", "\u2603"),
    ],
    ids=repr,
)
def test_normalize_name_still_accepts(raw, bound):
    """Visible names near the new rules stay valid; the trimmed name is kept as typed (#18)."""
    assert normalize_name(raw) == bound


LOOK_ALIKES = [
    ("alice", "\u0430lice"),  # Cyrillic a
    ("alice", "ALICE"),
    ("alice", "Alice"),
    ("alice", "\uff41\uff4c\uff49\uff43\uff45"),  # fullwidth
    ("alice", "\uff21\uff2c\uff29\uff23\uff25"),  # fullwidth capitals
    ("alice", "\u0430\u04cfice"),  # Cyrillic a and palochka
    ("ali ce", "ali\u00a0ce"),  # NBSP folds to a space
    ("mary", "rnary"),  # TR39 maps m to rn
    ("m", "rn"),
    ("paypal", "p\u0430yp\u0430l"),
    ("stra\u00dfe", "STRASSE"),  # case folding: sharp s
    ("\u00e9", "e\u0301"),  # NFKC: precomposed and combining
    ("KATE", "\u039a\u0391\u03a4\u0395"),  # Greek capitals: skeleton only
    ("Alice", "AIice"),  # capital i for l: skeleton only
    ("l1", "ll"),  # digit one for l
]


@pytest.mark.parametrize(("one", "other"), LOOK_ALIKES, ids=repr)
def test_look_alike_names_share_a_key(one, other):
    """Names equal after NFKC and case folding, or with equal TR39 skeletons, share
    `name_key` or `confusable_key`: the second one gets name_taken (#18)."""
    assert normalize_name(one) == one
    assert normalize_name(other) == other
    assert name_key(one) == name_key(other) or confusable_key(one) == confusable_key(other)


@pytest.mark.parametrize(
    ("one", "other"),
    [("alice", "bob"), ("alice", "alicia"), ("alice", "alice2"), ("anna", "arma"), ("li", "ll")],
    ids=repr,
)
def test_distinct_names_share_no_key(one, other):
    """Names that look different keep different keys."""
    assert name_key(one) != name_key(other)
    assert confusable_key(one) != confusable_key(other)


def test_skeleton_follows_tr39():
    """skeleton = NFD, map through confusables.txt, NFD (UTS #39 section 4)."""
    assert skeleton("m") == "rn"
    assert skeleton("\u0430") == "a"
    assert skeleton("I") == "l"
    assert skeleton("0") == "O"
    assert skeleton("\u00e9") == "e\u0301"
    assert skeleton("alice") == "alice"
    assert name_key("ALICE") == "alice"
    assert confusable_key("ALICE") == "ALlCE"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_name_rules_never_raise_and_keys_are_stable(raw):
    """Any text is judged without raising; a valid name's keys are deterministic and
    those of its NFKC form and its case fold are its name key (#18)."""
    name = normalize_name(raw)
    if name is None:
        return
    assert name_key(name) == name_key(name.casefold())
    assert confusable_key(name) == confusable_key(name)


@pytest.mark.parametrize(
    "room", ["lobby", "a", "0", "a_b-c", "room-42", "9_", "a" * 64, "a" + "-" * 63]
)
def test_is_valid_room_accepts(room):
    """Room names matching [a-z0-9][a-z0-9_-]{0,63} are valid."""
    assert is_valid_room(room)


@pytest.mark.parametrize(
    "room",
    ["", "Lobby", "-a", "_a", "a" * 65, "a b", "a.b", "a/b", "lobby\n", "é", "\uff41", "a\u0000"],
    ids=repr,
)
def test_is_valid_room_refuses(room):
    """Anything else is not a room name."""
    assert not is_valid_room(room)


# --- message ids -------------------------------------------------------------------


def test_make_id_and_seq_of_round_trip():
    """seq_of reads back the sequence number make_id put in."""
    for epoch in ("e1", "a3f09c1d", "with-dash"):
        for seq in (0, 1, 42, 10**12):
            assert make_id(epoch, seq) == f"{epoch}-{seq}"
            assert seq_of(epoch, make_id(epoch, seq)) == seq


@pytest.mark.parametrize(
    "message_id",
    ["e2-5", "e1", "e1-", "e1-x", "e1--5", "e1-5a", "e1-٣", "e1-w3", "xe1-5", "", "5"],
    ids=repr,
)
def test_seq_of_foreign_or_malformed_id_is_none(message_id):
    """An id of another epoch, or not of the form <epoch>-<digits>, has no seq."""
    assert seq_of("e1", message_id) is None


# --- encoding server frames ---------------------------------------------------------


def test_encode_message_exact_json():
    """A `message` encodes to exactly the fields of §4, in order."""
    frame = Message(room="lobby", id="e1-42", name="alice", msg="hello", ts=1795800000123)
    assert encode(frame) == (
        b'{"type":"message","room":"lobby","id":"e1-42","name":"alice",'
        b'"msg":"hello","ts":1795800000123}'
    )


def test_encode_message_non_ascii_is_utf8():
    """Non-ASCII text is UTF-8 JSON that round-trips."""
    frame = Message(room="lobby", id="e1-1", name="李雷", msg="Zoë 😀", ts=1)
    assert json.loads(encode(frame).decode("utf-8"))["msg"] == "Zoë 😀"


def test_encode_whisper_has_from_and_name():
    """A `whisper` encodes `from` (not `from_`) and repeats it as `name`."""
    frame = WhisperFrame(id="e1-w1", from_="alice", to="bob", name="alice", msg="psst", ts=7)
    assert json.loads(encode(frame)) == {
        "type": "whisper",
        "id": "e1-w1",
        "from": "alice",
        "to": "bob",
        "name": "alice",
        "msg": "psst",
        "ts": 7,
    }


def test_encode_error_omits_ref_when_none():
    """An `error` without a ref has only type, code and message."""
    frame = ErrorFrame(code="bad_json", message="frame is not valid JSON")
    assert (
        encode(frame) == b'{"type":"error","code":"bad_json","message":"frame is not valid JSON"}'
    )


def test_encode_error_with_ref():
    """An `error` with a ref carries it."""
    frame = ErrorFrame(code="rate_limited", message="slow down", ref="c-17")
    assert json.loads(encode(frame)) == {
        "type": "error",
        "code": "rate_limited",
        "message": "slow down",
        "ref": "c-17",
    }


# --- sans-I/O: no trio ------------------------------------------------------------------


def test_protocol_module_does_not_import_trio():
    """Importing triochat.protocol never imports trio (rule 1 of the module)."""
    code = "import sys, triochat.protocol; assert 'trio' not in sys.modules, 'trio imported'"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_sans_io_modules_do_not_import_trio():
    """protocol, frames, chat (and every part of it in triochat.state), events, recent,
    ratelimit and forwarded import no trio (the package __init__ aside)."""
    code = (
        "import sys, types, importlib, importlib.util\n"
        "spec = importlib.util.find_spec('triochat')\n"
        "pkg = types.ModuleType('triochat')\n"
        "pkg.__path__ = list(spec.submodule_search_locations)\n"
        "sys.modules['triochat'] = pkg\n"
        "import triochat.protocol, triochat.frames, triochat.chat, triochat.ratelimit\n"
        "import triochat.events, triochat.forwarded, triochat.recent\n"
        "import pkgutil, triochat.state\n"
        "for part in pkgutil.iter_modules(triochat.state.__path__):\n"
        "    importlib.import_module('triochat.state.' + part.name)\n"
        "assert 'triochat.state.says' in sys.modules, 'no parts found'\n"
        "assert 'trio' not in sys.modules, 'trio imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


# --- WebSocket framing -----------------------------------------------------------------


def parse_as_client(data: bytes) -> list:
    """Feed server bytes to websockets' sans-I/O client; return the frames it parsed."""
    client = Protocol(Side.CLIENT, state=State.OPEN, max_size=None)
    client.receive_data(data)
    assert client.parser_exc is None
    assert client.state is State.OPEN
    assert client.data_to_send() == []
    return client.events_received()


@pytest.mark.parametrize("length", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_websocket_text_frame_parses_in_websockets(length):
    """A framed payload of any length parses as one final text frame with that payload."""
    payload = bytes(i % 251 % 128 for i in range(length))  # ASCII: valid UTF-8
    [frame] = parse_as_client(websocket_text_frame(payload))
    assert frame.opcode is Opcode.TEXT
    assert frame.fin
    assert frame.data == payload


def test_websocket_text_frame_header_sizes():
    """The header is 2, 4 or 10 bytes as RFC 6455 §5.2 prescribes, never masked."""
    assert len(websocket_text_frame(b"x" * 125)) == 125 + 2
    assert len(websocket_text_frame(b"x" * 126)) == 126 + 4
    assert len(websocket_text_frame(b"x" * 65535)) == 65535 + 4
    assert len(websocket_text_frame(b"x" * 65536)) == 65536 + 10
    assert websocket_text_frame(b"x")[:2] == b"\x81\x01"


def test_websocket_text_frame_coalesced_frames_parse():
    """Several frames in one write parse as those frames, in order."""
    payloads = [b"", b"a" * 125, b"b" * 126, "Zoë 李雷 😀".encode(), b"c" * 65536, b"d" * 70000]
    data = b"".join(websocket_text_frame(p) for p in payloads)
    frames = parse_as_client(data)
    assert [f.opcode for f in frames] == [Opcode.TEXT] * len(payloads)
    assert [f.data for f in frames] == payloads


def test_websocket_text_frame_split_across_reads_parses():
    """A frame delivered one byte at a time still parses as one frame."""
    payload = b"e" * 300
    client = Protocol(Side.CLIENT, state=State.OPEN, max_size=None)
    for byte in websocket_text_frame(payload):
        client.receive_data(bytes([byte]))
    [frame] = client.events_received()
    assert (frame.opcode, frame.data) == (Opcode.TEXT, payload)


def test_out_frame_ws_parses_as_its_json():
    """OutFrame.ws is the frame's JSON as one WebSocket text frame; built once."""
    message = Message(room="lobby", id="e1-1", name="Zoë", msg="m" * 70000, ts=1)
    out = OutFrame.of(message, message.id)
    [frame] = parse_as_client(out.ws)
    assert frame.opcode is Opcode.TEXT
    assert frame.data == out.json == encode(message)
    assert json.loads(frame.data)["msg"] == "m" * 70000
    assert out.ws is out.ws


def test_outframe_holds_its_payload_once():
    """A queued frame keeps its WebSocket framing only; the JSON is read from its tail
    (a history reply of a megabyte is held once, not twice: #18)."""
    import gc

    from triochat.frames import OutFrame

    payload = b'{"type":"history","messages":"' + b"y" * 100_000 + b'"}'
    frame = OutFrame(payload, "e-1")
    held = [ref for ref in gc.get_referents(frame) if isinstance(ref, bytes)]
    assert held == [frame.ws]
    assert frame.json == payload
    assert frame.sse == b"id: e-1\ndata: " + payload + b"\n\n"
