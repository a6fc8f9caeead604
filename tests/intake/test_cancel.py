"""Cancelling jobs: by moving (or copying) a file into the cancel folder and
with `whisperd cancel ID|PATH`, for queued and running jobs.

The tests run `whisperd run` in a subprocess with the real tiny.en model on
real espeak-ng speech. Most share one daemon (one worker slot) for the module,
each with its own file names, and leave it idle; the test that needs two slots
starts its own. The long clip (the SENTENCES three times, about 130 s of
speech) keeps a worker busy long enough to cancel it mid-transcription.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import SENTENCES, SpeechFactory
from tests.daemon_harness import DaemonUnderTest
from whisperd.jobs import OUTPUT_FORMATS, FileIdentity, Job, JobState
from whisperd.watch.rules import WatchSpec
from whisperd.watch.watcher import Watcher

DaemonFactory = Callable[..., DaemonUnderTest]

# How long a cancel may take to show in the job store (generous: the machine is shared).
CANCEL_SECONDS = 15.0
# Info level: the watchdog's debug lines would bury the job events.
QUIET = {"log_level": "info"}


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[DaemonUnderTest]:
    daemon = DaemonUnderTest(tmp_path_factory.mktemp("cancel-daemon"), models_dir, daemon=QUIET)
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.close()


@pytest.fixture
def daemon(shared_daemon: DaemonUnderTest) -> Iterator[DaemonUnderTest]:
    """The module's daemon; whatever a test leaves queued or running is
    cancelled after it, so the next test finds an idle worker."""
    yield shared_daemon
    store = shared_daemon.store
    for job in store.list_jobs(states=[JobState.QUEUED, JobState.RUNNING], limit=1000):
        store.request_cancel(job.id, reason="test cleanup")
    shared_daemon.wait_for(
        lambda: not store.list_jobs(states=[JobState.QUEUED, JobState.RUNNING], limit=1),
        timeout=60.0,
        what="the daemon to go idle after the test",
    )


# --------------------------------------------------------------------------- helpers


def wait_until_transcribing(daemon: DaemonUnderTest, rel_path: str) -> Job:
    """Wait until the job runs and has reported progress (the model is loaded
    and decoding), so a cancel lands in the middle of the transcription."""

    def transcribing() -> bool:
        job = daemon.job_for(rel_path)
        if job is not None and not job.state.is_active:
            raise AssertionError(f"{rel_path} ended {job.state.value} ({job.last_error}) before the cancel")
        return job is not None and job.state is JobState.RUNNING and job.progress > 0

    daemon.wait_for(transcribing, timeout=120.0, what=f"{rel_path} transcribing")
    job = daemon.job_for(rel_path)
    assert job is not None
    return job


def outputs_named(daemon: DaemonUnderTest, stem: str) -> list[str]:
    """Files in the output folder belonging to `stem`, temp files included."""
    return sorted(name for name in os.listdir(daemon.output) if name.startswith((f"{stem}.", f".{stem}.")))


def worker_pids(daemon: DaemonUnderTest) -> dict[str, int]:
    """Slot name -> pid of the newest worker process the pool started for it."""
    return {event["slot"]: int(event["pid"]) for event in daemon.events("worker.started")}


def slot_of(job: Job) -> str:
    assert job.worker is not None
    return job.worker.rsplit("/", 1)[1]


def process_running(pid: int) -> bool:
    """True if pid is a live process (not gone, not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def kills_of(daemon: DaemonUnderTest, job: Job) -> list[dict[str, object]]:
    return [e for e in daemon.events("worker.killed") if e.get("job_id") == job.id]


def move_to_cancel(daemon: DaemonUnderTest, name: str) -> None:
    os.rename(daemon.inbox / name, daemon.cancel / name)


def assert_complete_outputs(daemon: DaemonUnderTest, stem: str) -> None:
    """Every format written whole: no temp files left, and txt and json agree."""
    assert outputs_named(daemon, stem) == sorted(f"{stem}.{fmt}" for fmt in OUTPUT_FORMATS)
    for fmt in OUTPUT_FORMATS:
        assert (daemon.output / f"{stem}.{fmt}").stat().st_size > 0, fmt
    data = json.loads((daemon.output / f"{stem}.json").read_text(encoding="utf-8"))
    txt = (daemon.output / f"{stem}.txt").read_text(encoding="utf-8")
    assert data["text"].split() == txt.split()  # the txt has one line per segment


def assert_cancelled_cleanly(daemon: DaemonUnderTest, rel_path: str) -> Job:
    job = daemon.wait_for_state(rel_path, JobState.CANCELLED, JobState.DONE, timeout=CANCEL_SECONDS)
    assert job.state is JobState.CANCELLED, f"{rel_path} ended {job.state.value}:\n{daemon.log_text()}"

    # The store may say cancelled before the outputs are gone: when the pool
    # kills the worker, it marks the job cancelled, then removes the outputs
    # (and temp files), logs job.cancelled, then worker.killed. A worker that
    # stops by itself removes them before it marks the job, and logs
    # job.cancelled after (unless the grace ran out and it was killed first:
    # worker.killed again). Either line means the cleanup is over.
    def cleaned_up() -> bool:
        return any(e.get("job_id") == job.id for e in daemon.events("job.cancelled") + kills_of(daemon, job))

    daemon.wait_for(cleaned_up, timeout=60.0, what=f"{rel_path}'s cancel logged")
    assert outputs_named(daemon, Path(rel_path).stem) == []
    return job


# --------------------------------------------------------------------------- the watcher


def test_a_file_moved_into_cancel_is_taken_at_once_a_new_file_after_settling(tmp_path: Path) -> None:
    """A moved file keeps its mtime from the inbox, where it already settled:
    the cancel must not wait settle_seconds again. A file written just now
    (a plain copy, maybe unfinished) still settles first."""
    inbox, cancel = tmp_path / "inbox", tmp_path / "cancel"
    inbox.mkdir()
    cancel.mkdir()
    moved, fresh, old_in_inbox = cancel / "moved.wav", cancel / "fresh.wav", inbox / "old.wav"
    for path in (moved, fresh, old_in_inbox):
        path.write_bytes(b"RIFF....WAVEfmt ")
    long_ago = time.time() - 120
    for path in (moved, old_in_inbox):
        os.utime(path, (long_ago, long_ago))
    clock = [1000.0]
    cancels: list[str] = []
    settled: list[str] = []

    def on_cancel(_spec: WatchSpec, path: str, _identity: FileIdentity) -> None:
        cancels.append(os.path.basename(path))

    def on_settled(_spec: WatchSpec, path: str, _identity: FileIdentity) -> None:
        settled.append(os.path.basename(path))

    watcher = Watcher(
        [WatchSpec(name="main", root=str(inbox), cancel_dir=str(cancel))],
        settle_seconds=30.0,
        rescan_seconds=0.0,
        on_settled=on_settled,
        on_cancel=on_cancel,
        on_rejected=lambda *_args: None,
        clock=lambda: clock[0],
    )
    watcher.start(observe=False, run_loop=False)
    try:
        watcher.step()
        assert cancels == ["moved.wav"]
        assert settled == []  # the inbox still waits, however old the file
        clock[0] += 31.0
        watcher.step()
        watcher.step()
        assert sorted(cancels) == ["fresh.wav", "moved.wav"]
        assert settled == ["old.wav"]
    finally:
        watcher.stop()


def test_a_file_moved_to_cancel_and_straight_back_is_a_new_drop(tmp_path: Path) -> None:
    """Real observers: the file is cancelled at once and, moved back before
    the watcher could see the inbox path empty, settles again as a new drop."""
    inbox, cancel = tmp_path / "inbox", tmp_path / "cancel"
    inbox.mkdir()
    cancel.mkdir()
    seen: list[tuple[str, str]] = []

    def recorder(kind: str) -> Callable[[WatchSpec, str, FileIdentity], None]:
        return lambda _spec, path, _identity: seen.append((kind, os.path.basename(path)))

    watcher = Watcher(
        [WatchSpec(name="main", root=str(inbox), cancel_dir=str(cancel))],
        settle_seconds=0.3,
        rescan_seconds=0.0,
        on_settled=recorder("settled"),
        on_cancel=recorder("cancel"),
        on_rejected=lambda *_args: None,
    )
    watcher.start()
    try:
        temp = inbox / ".talk.wav.part"
        temp.write_bytes(b"RIFF....WAVEfmt ")
        os.rename(temp, inbox / "talk.wav")
        wait_until(lambda: seen == [("settled", "talk.wav")], "the drop to settle")
        os.rename(inbox / "talk.wav", cancel / "talk.wav")
        wait_until(lambda: ("cancel", "talk.wav") in seen, "the cancel")
        os.rename(cancel / "talk.wav", inbox / "talk.wav")
        wait_until(lambda: seen.count(("settled", "talk.wav")) == 2, "the file moved back to settle again")
    finally:
        watcher.stop()


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# --------------------------------------------------------------------------- queued jobs


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cancelled_queued_job_is_never_claimed_and_moving_it_back_runs_it_again(
    daemon: DaemonUnderTest, long_clip: Path, speech: SpeechFactory
) -> None:
    daemon.drop(long_clip, "q-long.wav")
    wait_until_transcribing(daemon, "q-long.wav")
    daemon.drop(speech(SENTENCES[0], "q-second"))
    daemon.wait_for_state("q-second.wav", JobState.QUEUED, timeout=30)

    move_to_cancel(daemon, "q-second.wav")

    job = daemon.wait_for_state("q-second.wav", JobState.CANCELLED, timeout=CANCEL_SECONDS)
    assert job.attempts == 0 and job.started_at is None
    assert all(e["job_id"] != job.id for e in daemon.events("job.claimed"))
    assert outputs_named(daemon, "q-second") == []
    assert (daemon.cancel / "q-second.wav").is_file()
    assert not (daemon.inbox / "q-second.wav").exists()
    daemon.wait_for_event("job.cancelled", job_id=job.id, phase="queued")

    # Free the worker: the long job is not this test's subject.
    move_to_cancel(daemon, "q-long.wav")
    assert_cancelled_cleanly(daemon, "q-long.wav")

    # Moving the file back from cancel/ is a new drop: a new job that ends done.
    os.rename(daemon.cancel / "q-second.wav", daemon.inbox / "q-second.wav")
    again = daemon.wait_for_state("q-second.wav", JobState.DONE, timeout=120.0)
    assert again.id != job.id
    assert_complete_outputs(daemon, "q-second")
    # The worker records done first and moves the source a moment later.
    daemon.wait_for(
        lambda: (daemon.store.get(again.id) or again).disposed_at is not None,
        timeout=60.0,
        what="q-second.wav moved after its job ended",
    )
    assert (daemon.done / "q-second.wav").is_file()
    old = daemon.store.get(job.id)
    assert old is not None and old.state is JobState.CANCELLED


# --------------------------------------------------------------------------- running jobs


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_moving_a_running_job_into_cancel_stops_it_and_the_next_job_runs(
    daemon: DaemonUnderTest, long_clip: Path, speech: SpeechFactory
) -> None:
    daemon.drop(long_clip, "run-long.wav")
    running = wait_until_transcribing(daemon, "run-long.wav")
    pid = worker_pids(daemon)[slot_of(running)]

    move_to_cancel(daemon, "run-long.wav")

    job = assert_cancelled_cleanly(daemon, "run-long.wav")
    assert job.progress < 1.0
    assert (daemon.cancel / "run-long.wav").is_file()
    # The worker either stopped the job itself and is idle again, or overran
    # the grace period and was killed (and replaced).
    daemon.wait_for(
        lambda: (
            bool(kills_of(daemon, job))
            or any("seconds" in e for e in daemon.events("job.cancelled") if e["job_id"] == job.id)
        ),
        timeout=10.0,
        what="the cancelled job's worker to stop or be killed",
    )

    daemon.drop(speech(SENTENCES[1], "run-next"))
    daemon.wait_for_state("run-next.wav", JobState.DONE, timeout=120.0)
    assert_complete_outputs(daemon, "run-next")
    assert outputs_named(daemon, "run-long") == []
    # Judged only now: a worker that logged its own stop may still be killed
    # if the grace ran out before it left the job; by the end of the next job
    # (seconds later) the grace is long over.
    if kills_of(daemon, job):
        daemon.wait_for(lambda: not process_running(pid), timeout=10.0, what=f"worker {pid} gone")
        assert worker_pids(daemon)[slot_of(running)] != pid
    else:
        assert process_running(pid) and worker_pids(daemon)[slot_of(running)] == pid


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_copying_a_running_jobs_file_into_cancel_stops_it(daemon: DaemonUnderTest, long_clip: Path) -> None:
    daemon.drop(long_clip, "copy-long.wav")
    wait_until_transcribing(daemon, "copy-long.wav")

    # A plain copy: new inode, new mtime; it is matched by name and size.
    shutil.copyfile(daemon.inbox / "copy-long.wav", daemon.cancel / "copy-long.wav")

    assert_cancelled_cleanly(daemon, "copy-long.wav")
    assert (daemon.cancel / "copy-long.wav").is_file()
    # The original follows the copy into cancel/, under a name of its own.
    daemon.wait_for(
        lambda: (
            not (daemon.inbox / "copy-long.wav").exists() and (daemon.cancel / "copy-long (2).wav").is_file()
        ),
        timeout=30.0,
        what="the original copy-long.wav moved into cancel/",
    )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cancelling_a_finished_job_changes_nothing_and_says_so(
    daemon: DaemonUnderTest, speech: SpeechFactory
) -> None:
    daemon.drop(speech(SENTENCES[2], "finished"))
    done = daemon.wait_for_state("finished.wav", JobState.DONE, timeout=120.0)
    daemon.wait_for((daemon.done / "finished.wav").is_file, timeout=30.0, what="source in done/")

    os.rename(daemon.done / "finished.wav", daemon.cancel / "finished.wav")

    event = daemon.wait_for_event("cancel.no_active_job", timeout=30.0, file="finished.wav")
    assert event["inbox"] == "main"
    after = daemon.store.get(done.id)
    assert after is not None and after.state is JobState.DONE and not after.cancel_requested
    assert_complete_outputs(daemon, "finished")
    assert (daemon.cancel / "finished.wav").is_file()


# --------------------------------------------------------------------------- whisperd cancel


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_whisperd_cancel_by_id_and_by_path_for_queued_and_running_jobs(
    daemon: DaemonUnderTest, long_clip: Path, speech: SpeechFactory
) -> None:
    # Queue in a known order: two long jobs, then two short ones behind them
    # (they stay queued while either long job runs).
    daemon.drop(long_clip, "cli-first.wav")
    daemon.wait_for_state("cli-first.wav", JobState.RUNNING, timeout=30)
    daemon.drop(long_clip, "cli-second.wav")
    daemon.wait_for_state("cli-second.wav", JobState.QUEUED, timeout=30)
    for name in ("cli-by-id", "cli-by-path"):
        daemon.drop(speech(SENTENCES[3], name))
    by_id = daemon.wait_for_state("cli-by-id.wav", JobState.QUEUED, timeout=30)
    daemon.wait_for_state("cli-by-path.wav", JobState.QUEUED, timeout=30)

    # Queued, by id and by path.
    reply = daemon.cli("cancel", str(by_id.id))
    assert reply.returncode == 0 and f"job {by_id.id} cancelled" in reply.stdout, reply
    reply = daemon.cli("cancel", str(daemon.inbox / "cli-by-path.wav"))
    assert reply.returncode == 0 and "cancelled" in reply.stdout, reply
    for name in ("cli-by-id.wav", "cli-by-path.wav"):
        job = daemon.wait_for_state(name, JobState.CANCELLED, timeout=CANCEL_SECONDS)
        assert job.attempts == 0 and job.started_at is None

    # Running, by id.
    first = wait_until_transcribing(daemon, "cli-first.wav")
    reply = daemon.cli("cancel", str(first.id))
    assert reply.returncode == 0 and "is running" in reply.stdout, reply
    assert_cancelled_cleanly(daemon, "cli-first.wav")

    # Running, by path (relative to the current folder, as a user types it).
    wait_until_transcribing(daemon, "cli-second.wav")
    relative = os.path.relpath(daemon.inbox / "cli-second.wav")
    reply = daemon.cli("cancel", relative)
    assert reply.returncode == 0 and "is running" in reply.stdout, (reply, daemon.job_for("cli-second.wav"))
    assert_cancelled_cleanly(daemon, "cli-second.wav")

    # Cancelled without a move, the queued files are put into cancel/ by the
    # daemon's sweep (within seconds).
    for name in ("cli-by-id.wav", "cli-by-path.wav"):
        daemon.wait_for((daemon.cancel / name).is_file, timeout=30.0, what=f"{name} in cancel/")
    reply = daemon.cli("cancel", str(first.id))
    assert reply.returncode == 0 and "already cancelled" in reply.stdout, reply


# --------------------------------------------------------------------------- isolation and races


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cancel_never_kills_the_worker_of_another_job(daemon_factory: DaemonFactory, long_clip: Path) -> None:
    # No grace period: the pool kills the cancelled job's worker at its next
    # pass unless it already stopped, the harshest path; the other slot must
    # not notice either way.
    daemon = daemon_factory(daemon=QUIET, workers={"cpu_slots": 2, "cancel_grace_seconds": 0.0})
    daemon.start()
    daemon.drop(long_clip, "a.wav")
    daemon.drop(long_clip, "b.wav")
    a = wait_until_transcribing(daemon, "a.wav")
    b = wait_until_transcribing(daemon, "b.wav")
    assert slot_of(a) != slot_of(b)
    pid_b = worker_pids(daemon)[slot_of(b)]

    move_to_cancel(daemon, "a.wav")

    assert_cancelled_cleanly(daemon, "a.wav")
    done = daemon.wait_for_state("b.wav", JobState.DONE, timeout=240.0)
    assert done.attempts == 1
    assert_complete_outputs(daemon, "b")
    assert worker_pids(daemon)[slot_of(b)] == pid_b and process_running(pid_b)
    assert all(e["slot"] != slot_of(b) for e in daemon.events("worker.killed"))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cancel_racing_the_end_of_a_job_gives_done_or_cancelled_never_both(
    daemon: DaemonUnderTest, speech: SpeechFactory, long_clip: Path
) -> None:
    clip = speech(SENTENCES[4], "race")
    # Two runs without a cancel: the first may load the model, the second
    # says how long a warm run takes, to aim the cancels at the end of a run.
    for warm_up in ("race-warm-0.wav", "race-warm-1.wav"):
        daemon.drop(clip, warm_up)
        timed = daemon.wait_for_state(warm_up, JobState.DONE, timeout=120.0)
    assert timed.started_at is not None and timed.finished_at is not None
    run_seconds = timed.finished_at - timed.started_at

    # Each cancel lands in one of three windows, which the store's answer to
    # the request says: "queued" (not started: cancelled at once), "running"
    # (flagged for the worker, which stops, or had already committed to
    # finishing), "ended" (already done: the request changes nothing).
    # The first attempt cancels a long recording as soon as it runs (must end
    # cancelled), the last one waits for the end (must end done); those
    # between aim at the end of a run of the short clip.
    seen: dict[str, tuple[str, JobState]] = {}
    aims = [(long_clip, 0.0), *((clip, share) for share in (0.75, 0.9, 1.0, 1.1)), (clip, None)]
    for attempt, (source, share) in enumerate(aims, start=1):
        name = f"race-{attempt}.wav"
        daemon.drop(source, name)
        job = daemon.wait_for_state(name, JobState.RUNNING, JobState.DONE, timeout=60.0)
        assert job.started_at is not None
        if share is None:
            daemon.wait_for_state(name, JobState.DONE, timeout=120.0)
        else:
            time.sleep(max(0.0, job.started_at + run_seconds * share - time.time()))
        answer = daemon.store.request_cancel(job.id, reason="race test")  # what `whisperd cancel ID` does
        assert answer is not None
        window = {JobState.QUEUED: "queued", JobState.RUNNING: "running"}.get(answer.state, "ended")
        assert window != "running" or answer.cancel_requested, answer
        end = daemon.wait_for_state(name, JobState.DONE, JobState.CANCELLED, timeout=60.0).state
        seen[name] = (window, end)

    # A later job done on the same (single) worker: a late flip of a race job,
    # or a late output or move, would have happened before it.
    daemon.drop(clip, "race-after.wav")
    daemon.wait_for_state("race-after.wav", JobState.DONE, timeout=120.0)

    assert seen["race-1.wav"] == ("running", JobState.CANCELLED), seen
    assert seen["race-6.wav"] == ("ended", JobState.DONE), seen
    for name, (window, state) in seen.items():
        # A request after the end never changes it; one before the start always cancels.
        assert window != "ended" or state is JobState.DONE, seen
        assert window != "queued" or state is JobState.CANCELLED, seen
        after = daemon.job_for(name)
        assert after is not None and after.state is state, seen
        stem = Path(name).stem
        if state is JobState.DONE:
            assert_complete_outputs(daemon, stem)
        else:
            assert outputs_named(daemon, stem) == [], seen
        # The source goes where the end state says, never both ways.
        where = daemon.done if state is JobState.DONE else daemon.cancel
        assert (where / name).is_file(), (name, where, seen)
        assert not (daemon.done / name).exists() or not (daemon.cancel / name).exists()
