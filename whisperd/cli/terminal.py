"""Text made safe for an operator's terminal, and the one way the CLI prints it.

File names, error messages and reasons come from users who drop files: an
escape sequence in a name could retitle or clear the terminal that runs
`whisperd status`, a newline could forge a line, a bidi override could make a
name read backwards. Everything the CLI prints goes through terminal_safe().
"""

from __future__ import annotations

import re
import sys
from typing import TextIO

# Formatting characters that reorder or hide text: bidi embeddings/overrides
# and isolates, the directional marks, and the Arabic letter mark.
_BIDI = "\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
# C0 controls, DEL, C1 controls, bidi formatting, lone surrogates (undecodable
# bytes of a file name under surrogateescape) and the line/paragraph separators.
_UNSAFE = re.compile(f"[\x00-\x1f\x7f-\x9f{_BIDI}\u2028\u2029\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # a raw byte kept by os.fsdecode
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def terminal_safe(text: object) -> str:
    """`text` with every control, bidi-formatting and undecodable character
    written as a visible escape (\\x1b, \\n, \\u202e); printable text unchanged."""
    return _UNSAFE.sub(_escape, str(text))


def say(*lines: object, file: TextIO | None = None) -> None:
    """Print each of `lines` as one line, escaped for the terminal: names,
    errors and reasons come from users and may hold control characters."""
    for line in lines or ("",):
        print(terminal_safe(line), file=file or sys.stdout)
