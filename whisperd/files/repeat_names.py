"""Names for a source dropped again under a name that has been used before.

Phones and meeting tools reuse names (`Recording.m4a`): the second drop is a
new job, its source goes to done/ as `Recording (2).m4a`, and its transcript
must not overwrite the first one's. The outputs get the same number as the
source in done/ (`Recording (2).txt`), in subfolders too.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence

from whisperd.files.names import NAME_MAX, fit_name, name_bytes
from whisperd.jobs import Job

# How many numbered names are tried before giving up on a free one.
_MAX_NUMBER = 10_000


def _numbered(rel_path: str, number: int) -> str:
    """`stem (N).ext`, fitted to NAME_MAX as outputs.move_source names it in done/."""
    stem, ext = os.path.splitext(os.path.basename(rel_path))
    return os.path.join(os.path.dirname(rel_path), fit_name(stem, f" ({number}){ext}"))


def _numbered_output_stem(rel_path: str, number: int, suffixes: Sequence[str]) -> str:
    """`stem (N)` for the outputs, with room left for the longest `.<fmt>`."""
    stem = os.path.splitext(os.path.basename(rel_path))[0]
    room = NAME_MAX - max((name_bytes(suffix) for suffix in suffixes), default=0)
    return fit_name(stem, f" ({number})", limit=room)


def unrepeated_base(
    base: str,
    rel_path: str,
    formats: Sequence[str],
    *,
    owned_by_other_job: Callable[[str], bool],
    done_dir: str,
) -> str:
    """`base` (from outputs.choose_output_base), or `stem (N)` next to it when
    another job of the same name owns one of its outputs. N is the first number
    whose outputs are free and whose done/ name (`stem (N).ext`) is unused, so
    the source moved there later (done_rel_path) gets the same number."""
    if not any(owned_by_other_job(f"{base}.{fmt}") for fmt in formats):
        return base
    folder = os.path.dirname(base)
    for number in range(2, _MAX_NUMBER):
        numbered_rel = _numbered(rel_path, number)
        candidate = os.path.join(folder, _numbered_output_stem(rel_path, number, [f".{f}" for f in formats]))
        if any(owned_by_other_job(f"{candidate}.{fmt}") for fmt in formats):
            continue
        if os.path.lexists(os.path.join(done_dir, numbered_rel)):
            continue
        return candidate
    return base  # every number used: choose_output_base's answer stands


def done_rel_path(job: Job) -> str:
    """Where in done/ a finished job's source goes: its rel_path, or, when
    that is taken, the numbered name its outputs were given
    (`Recording (2).m4a` for `Recording (2).txt`)."""
    rel_path = job.spec.rel_path
    if not job.outputs or not os.path.lexists(os.path.join(job.spec.done_dir, rel_path)):
        return rel_path  # the plain name is free (the earlier source never reached done/)
    out_base, _ext = os.path.splitext(os.path.basename(job.outputs[0]))
    found = re.search(r" \((\d+)\)$", out_base)
    if found is None:
        return rel_path
    number = int(found.group(1))
    suffixes = [os.path.splitext(path)[1] for path in job.outputs]
    return (
        _numbered(rel_path, number)
        if out_base == _numbered_output_stem(rel_path, number, suffixes)
        else rel_path
    )
