"""Recordings of real people (tests/data/speech) chained the way people
speak: several speakers, pauses of 0.3-1.5 s, seeded so every run builds the
same recordings. Shared by the accuracy tests and bench/real_speech.py."""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from whisper.normalizers import EnglishTextNormalizer

from whisperd.media.decode import SAMPLE_RATE, decode_audio

SPEECH = Path(__file__).resolve().parent / "data" / "speech"

Audio = np.ndarray[Any, np.dtype[np.float32]]

normalise = EnglishTextNormalizer()


@dataclass(frozen=True)
class Utterance:
    ident: str
    speaker: str
    text: str
    audio: Audio


@dataclass(frozen=True)
class Placed:
    """An utterance where a chain put it (seconds)."""

    utterance: Utterance
    start: float
    end: float


def chainable(ident: str) -> bool:
    # Dates and numbers (Whisper writes digits) and the 50 s reading are left out.
    return not ident.startswith("an4_") and ident != "sonnet001"


def utterances() -> list[Utterance]:
    with (SPEECH / "transcripts.tsv").open(encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream, delimiter="\t"))
    return [
        Utterance(row["id"], row["speaker"], row["text"], decode_audio(str(SPEECH / f"{row['id']}.flac")))
        for row in rows
        if chainable(row["id"])
    ]


def chain(pool: list[Utterance], seed: int, count: int = 10) -> tuple[Audio, list[Placed]]:
    """`count` utterances drawn from `pool` (seed), with 0.3-1.5 s of silence between."""
    rng = random.Random(seed)
    parts: list[Audio] = []
    placed: list[Placed] = []
    position = 0
    for n, utterance in enumerate(rng.sample(pool, count)):
        if n:
            pause = np.zeros(int(rng.uniform(0.3, 1.5) * SAMPLE_RATE), np.float32)
            parts.append(pause)
            position += len(pause)
        parts.append(utterance.audio)
        end = position + len(utterance.audio)
        placed.append(Placed(utterance, position / SAMPLE_RATE, end / SAMPLE_RATE))
        position = end
    return np.concatenate(parts).astype(np.float32), placed


def reference(placed: list[Placed]) -> str:
    return " ".join(p.utterance.text for p in placed)


def dropped(utterance: Utterance, hypothesis: str) -> bool:
    """Whether the transcript lacks most of the utterance's words."""
    words = normalise(utterance.text).split()
    said = set(normalise(hypothesis).split())
    return bool(words) and sum(w in said for w in words) / len(words) < 0.5
