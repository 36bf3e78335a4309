"""The name rules (docs/protocol.md §2.1 and §6), sans-I/O: which names are
valid, and when two names are one.

`normalize_name` decides what a requested name binds to (or that it is
refused); `name_key` and `confusable_key` are a valid name's two identities,
which no two present users share. Everything here is a pure function of its
arguments and Unicode's tables; `triochat.protocol` re-exports it all.

Rules of this module: it never imports trio and never does I/O (a test
asserts it, through `triochat.protocol`); the 90 KB confusables table
(`triochat._confusables`) is parsed on the first name checked, not at import.
"""

from __future__ import annotations

import bisect
import functools
import unicodedata
from typing import Final

__all__ = [
    "FORBIDDEN_NAME_CATEGORIES",
    "INVISIBLE_NAME_RANGES",
    "MAX_NAME_CHARS",
    "RESERVED_NAMES",
    "confusable_key",
    "name_key",
    "normalize_name",
    "skeleton",
]

MAX_NAME_CHARS: Final = 32  # code points, after trimming
# Unicode categories a name may not contain (docs/protocol.md section 2.1):
# control, format, line/paragraph separators, surrogates, private use, and
# unassigned (which covers the noncharacters U+FDD0-FDEF and U+xFFFE/xFFFF).
# "Unassigned" is per the running Python's Unicode database (unicodedata).
FORBIDDEN_NAME_CATEGORIES: Final = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})
#: Code points a name may not contain although their category is allowed: they
#: render as nothing, so "alice" plus one of them would pass for "alice".
#: Unicode's Default_Ignorable_Code_Point (DerivedCoreProperties.txt, 15.0.0;
#: the Cf and Cn ones are refused by category anyway), plus U+2800 BRAILLE
#: PATTERN BLANK. Inclusive (first, last) ranges, sorted.
INVISIBLE_NAME_RANGES: Final[tuple[tuple[int, int], ...]] = (
    (0x00AD, 0x00AD),  # soft hyphen
    (0x034F, 0x034F),  # combining grapheme joiner
    (0x061C, 0x061C),  # Arabic letter mark
    (0x115F, 0x1160),  # Hangul choseong/jungseong fillers
    (0x17B4, 0x17B5),  # Khmer inherent vowels
    (0x180B, 0x180F),  # Mongolian free variation selectors, vowel separator
    (0x200B, 0x200F),  # zero width space/joiners, LRM, RLM
    (0x202A, 0x202E),  # bidi embeddings and overrides
    (0x2060, 0x206F),  # word joiner, invisible operators, bidi isolates
    (0x2800, 0x2800),  # braille pattern blank (not Default_Ignorable, but blank)
    (0x3164, 0x3164),  # Hangul filler
    (0xFE00, 0xFE0F),  # variation selectors 1-16
    (0xFEFF, 0xFEFF),  # zero width no-break space (BOM)
    (0xFFA0, 0xFFA0),  # halfwidth Hangul filler
    (0xFFF0, 0xFFF8),  # reserved
    (0x1BCA0, 0x1BCA3),  # shorthand format controls
    (0x1D173, 0x1D17A),  # musical symbol beams and phrases
    (0xE0000, 0xE0FFF),  # tags, variation selectors 17-256, reserved
)
_INVISIBLE_STARTS: Final = tuple(first for first, _ in INVISIBLE_NAME_RANGES)
#: Names nobody may take: the server speaks as "server" (a classic
#: connection's errors, §7). Compared by `name_key` and `confusable_key`.
RESERVED_NAMES: Final = ("server", "system")


def normalize_name(name: str) -> str | None:
    """The name to bind for a requested one, or None if it is not a valid name.

    The rules of docs/protocol.md section 2.1: trims leading and trailing
    Unicode white space; then 1-32 code points; none of the categories in
    `FORBIDDEN_NAME_CATEGORIES` nor a code point of `INVISIBLE_NAME_RANGES`
    (both hide look-alike spoofs); not only combining marks and spaces (a
    name that renders as nothing); not one of `RESERVED_NAMES` or a
    look-alike of one.
    """
    trimmed = name.strip()
    if not 1 <= len(trimmed) <= MAX_NAME_CHARS:
        return None
    # Cached by the trimmed name only: a request's raw one may be a frame long.
    return _checked_name(trimmed)


@functools.lru_cache(maxsize=4096)  # a join checks its name more than once
def _checked_name(trimmed: str) -> str | None:
    """`normalize_name` of a trimmed name of 1-32 code points."""
    # Printable ASCII (U+0020-U+007E) passes the character rules at once: all
    # allowed categories, none invisible, and a trimmed name starts visible.
    if not (trimmed.isascii() and trimmed.isprintable()):
        visible = False
        for char in trimmed:
            category = unicodedata.category(char)
            if category in FORBIDDEN_NAME_CATEGORIES or _invisible(char):
                return None
            if category[0] not in "MZ":
                visible = True
        if not visible:
            return None
    if name_key(trimmed) in _reserved_keys() or confusable_key(trimmed) in _reserved_keys():
        return None
    return trimmed


def _invisible(char: str) -> bool:
    point = ord(char)
    index = bisect.bisect_right(_INVISIBLE_STARTS, point) - 1
    return index >= 0 and point <= INVISIBLE_NAME_RANGES[index][1]


# --- name identity (docs/protocol.md sections 2.1 and 6) ------------------------
# Two present users never have names with the same `name_key` (equal after NFKC
# and case folding, or look-alikes once folded: "\u0430lice" with a Cyrillic a,
# fullwidth "\uff21LICE") nor the same `confusable_key` (Unicode TR39 skeletons
# of the names as typed: Greek capitals "\u039a\u0391TE" and "KATE", "AIice"
# with a capital i and "Alice").
# One key cannot do both: "AIice" folds to "aiice" but looks like "Alice", so
# the closure of both rules would make every "i" an "l". Hence two keys.


@functools.cache
def _prototypes() -> dict[str, str]:
    """TR39's confusables.txt as char -> prototype; parsed once, on first use."""
    from ._confusables import PROTOTYPES  # ~90 KB: loaded only when a name is checked

    table: dict[str, str] = {}
    for line in PROTOTYPES.splitlines():
        source, *target = line.split()
        table[chr(int(source, 16))] = "".join(chr(int(point, 16)) for point in target)
    return table


def skeleton(text: str) -> str:
    """The Unicode TR39 skeleton of ``text``: NFD, each character mapped to its
    confusables.txt prototype, NFD again. Equal skeletons: look-alikes."""
    table = _prototypes()
    mapped = "".join(table.get(char, char) for char in unicodedata.normalize("NFD", text))
    return unicodedata.normalize("NFD", mapped)


@functools.lru_cache(maxsize=4096)  # cluster entries and whispers repeat names
def name_key(name: str) -> str:
    """The identity of a (valid, trimmed) name: skeleton(casefold(NFKC(name))).

    Names with the same key are one name: a second user cannot take it
    (`name_taken`), a whisper `to` any of them reaches its holder, and a
    cluster claims the key (docs/protocol.md sections 2.1, 3 and 14).
    """
    return skeleton(unicodedata.normalize("NFKC", name).casefold())


@functools.lru_cache(maxsize=4096)
def confusable_key(name: str) -> str:
    """The TR39 skeleton of a (valid, trimmed) name as typed: a second key that
    two present users may not share (docs/protocol.md §2.1), for look-alikes
    that case folding hides from `name_key` (Greek capitals, "I" for "l")."""
    return skeleton(name)


@functools.cache
def _reserved_keys() -> frozenset[str]:
    return frozenset(
        key for name in RESERVED_NAMES for key in (name_key(name), confusable_key(name))
    )
