"""Names whisperd derives from a source name, made to fit NAME_MAX.

A file system limits each path component to NAME_MAX bytes (255 on Linux),
while whisperd appends to names it is given (`talk.mp3.error.txt`,
`talk (2).mp3`, `.talk.txt.<random>.whisperd-tmp`). A source name near the limit
would make every such derived name fail with ENAMETOOLONG, so every derived
name goes through fit_name: it is returned unchanged when it fits, otherwise its
stem is cut (on a character boundary of its encoded bytes) and a short hash of
the full name is added, so the result is deterministic and two long names that
share a prefix still get different derived names.
"""

from __future__ import annotations

import hashlib
import os

# Bytes per path component on Linux (and most Unix file systems).
NAME_MAX = 255

# Hex digits of the full name's hash kept in a shortened name.
_HASH_CHARS = 10

# An extension longer than this is not one a user would miss: it is cut like the stem.
_MAX_EXT_BYTES = 16


def name_bytes(name: str) -> int:
    """Length of name as the file system sees it (undecodable bytes count as one)."""
    return len(os.fsencode(name))


def split_ext(name: str) -> tuple[str, str]:
    """(stem, ext) like os.path.splitext, with an implausibly long ext left in the stem."""
    stem, ext = os.path.splitext(name)
    if name_bytes(ext) > _MAX_EXT_BYTES:
        return name, ""
    return stem, ext


def _cut(text: str, limit: int) -> str:
    """The longest prefix of text whose encoded length is at most limit bytes;
    characters are never split."""
    used = 0
    for index, char in enumerate(text):
        used += name_bytes(char)
        if used > limit:
            return text[:index]
    return text


def fit_name(stem: str, suffix: str = "", *, limit: int = NAME_MAX) -> str:
    """stem + suffix if that fits limit bytes; else a shortened stem, `~`, a
    hash of the full name, then suffix (kept whole: it carries the extension
    and what whisperd appended). A suffix too long to keep is cut as well."""
    full = stem + suffix
    if name_bytes(full) <= limit:
        return full
    digest = hashlib.sha256(os.fsencode(full)).hexdigest()[:_HASH_CHARS]
    tag = f"~{digest}"
    room = limit - name_bytes(tag) - name_bytes(suffix)
    if room < 1:
        # The suffix alone leaves no room: cut the whole name instead.
        suffix, stem = "", full
        room = limit - name_bytes(tag)
    return f"{_cut(stem, room)}{tag}{suffix}"
