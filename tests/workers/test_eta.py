"""A running job's ETA as its worker computes it for each heartbeat: from the
job's own rate once its progress moves, from the realtime factor of earlier
jobs of its model on its device before that (see test_progress.py for the
real daemon)."""

from __future__ import annotations

import multiprocessing

import pytest

from whisperd.workers.channel import Doorbell, Flag, SlotChannel
from whisperd.workers.job_session import JobSession


def _session() -> JobSession:
    ctx = multiprocessing.get_context("spawn")
    channel = SlotChannel(
        paused=Flag(ctx),
        stop=Flag(ctx),
        wake=Doorbell(ctx),
        current_job=ctx.Value("q", 0, lock=False),
        cancel_job=ctx.Value("q", 0, lock=False),
        switch_lock=ctx.Lock(),
        events=None,  # this session reports no events
    )
    return JobSession(job_id=7, channel=channel)


def test_before_its_progress_moves_a_job_gets_the_eta_of_earlier_jobs_of_its_model() -> None:
    session = _session()
    assert session.snapshot() == (0.0, None)  # model still loading: no clock yet
    session.decoding_started(100.0, expected_realtime_factor=0.3)
    assert session.decoding_since is not None
    began = session.decoding_since
    # 100 s of audio at 0.3 s per audio second, 10 s of it spent already.
    fraction, eta = session.snapshot(now=began + 10.0)
    assert fraction == 0.0 and eta == pytest.approx(20.0)
    assert session.snapshot(now=began + 60.0) == (0.0, 0.0)  # slower than the others: not negative
    # Once the job's own progress moves, its own rate decides.
    session.progress(0.25)
    fraction, eta = session.snapshot(now=began + 10.0)
    assert fraction == 0.25 and eta == pytest.approx(30.0)
    session.progress(0.2)  # a fallback decoding a window again never moves progress back
    assert session.fraction == 0.25


def test_without_earlier_jobs_the_eta_is_unknown_until_progress_moves() -> None:
    session = _session()
    session.decoding_started(100.0, expected_realtime_factor=None)
    assert session.decoding_since is not None
    assert session.snapshot(now=session.decoding_since + 5.0) == (0.0, None)
