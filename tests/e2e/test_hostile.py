"""Hostile inputs against the real daemon: broken media, odd names, links,
limits, files that change or vanish under it, a full output disk.

One daemon serves the module (four inboxes, one per configuration); each test
drops its own uniquely named files. Every test also checks that the daemon
wrote nothing outside its configured folders.

Run as root, the daemon is started without root's file-permission override
(setpriv drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH), as a service user
would run it, so that an unreadable file really is unreadable.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import SENTENCES, _synthesised, wer
from tests.daemon_harness import DaemonUnderTest, WrappedDaemon
from whisperd.files.atomic import TMP_MARKER
from whisperd.jobs import Job, JobState
from whisperd.watch.rules import REASON_SYMLINK_OUTSIDE, REASON_SYMLINK_REFUSED

pytestmark = pytest.mark.slow

ClipFactory = Callable[..., Path]
Snapshot = dict[str, tuple[str, int, int]]

SHORT_TEXT = "Please close the window before you leave the house."
# All five sentences: about a minute of speech, to keep the only worker busy.
BUSY_TEXT = " ".join(SENTENCES)
# Inbox limits of the "small" and "short" inboxes.
SIZE_LIMIT_MB = 0.01
DURATION_LIMIT_SECONDS = 3.0


# --------------------------------------------------------------------------- the daemon


def _without_root_file_access() -> list[str] | None:
    """A wrapper that runs the daemon without root's permission override; []
    when not root (nothing to drop), None when root and setpriv is missing."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        return None
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]


@pytest.fixture(scope="module")
def unprivileged() -> list[str] | None:
    return _without_root_file_access()


@pytest.fixture(scope="module")
def daemon(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path, unprivileged: list[str] | None
) -> Iterator[DaemonUnderTest]:
    root = tmp_path_factory.mktemp("hostile")
    inboxes = [
        DaemonUnderTest.default_inbox(root),
        DaemonUnderTest.default_inbox(root, "links", allow_symlinks=True),
        DaemonUnderTest.default_inbox(root, "small", max_size_mb=SIZE_LIMIT_MB),
        DaemonUnderTest.default_inbox(root, "short", max_duration_seconds=DURATION_LIMIT_SECONDS),
    ]
    under_test = WrappedDaemon(
        root, models_dir, wrapper=unprivileged or [], inboxes=inboxes, daemon={"settle_seconds": 1.0}
    )
    try:
        under_test.start()
        yield under_test
    finally:
        under_test.close()


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory, _speech_cache: Path) -> ClipFactory:
    """clips(text, name, fmt="wav") -> a fresh copy of espeak-ng speech,
    outside every daemon folder."""
    folder = tmp_path_factory.mktemp("hostile-sources")

    def make(text: str, name: str, fmt: str = "wav") -> Path:
        destination = folder / f"{name}.{fmt}"
        shutil.copyfile(_synthesised(_speech_cache, text, fmt, "en-us", 150, False), destination)
        return destination

    return make


def folders(daemon: DaemonUnderTest, inbox: str = "main") -> dict[str, Path]:
    config = next(i for i in daemon.inboxes if i["name"] == inbox)
    return {key: Path(config[key]) for key in ("path", "output", "cancel", "done", "failed")}


# --------------------------------------------------------------------------- nothing outside


def _configured(daemon: DaemonUnderTest) -> list[Path]:
    return [
        daemon.state_dir,
        *(p for inbox in daemon.inboxes for p in folders(daemon, inbox["name"]).values()),
    ]


def snapshot_outside(daemon: DaemonUnderTest) -> Snapshot:
    """Every entry under the daemon's root that is not in a configured folder."""
    skipped = {str(p) for p in _configured(daemon)}
    found: Snapshot = {}
    for folder, dirs, files in os.walk(daemon.root):
        dirs[:] = [d for d in dirs if os.path.join(folder, d) not in skipped]
        for name in [*dirs, *files]:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            if name in dirs:
                found[os.path.relpath(path, daemon.root)] = ("dir", 0, 0)
            else:
                found[os.path.relpath(path, daemon.root)] = ("file", st.st_size, st.st_mtime_ns)
    return found


@pytest.fixture(autouse=True)
def _nothing_written_outside(request: pytest.FixtureRequest) -> Iterator[None]:
    if "daemon" not in request.fixturenames:
        yield
        return
    under_test: DaemonUnderTest = request.getfixturevalue("daemon")
    before = snapshot_outside(under_test)
    yield
    assert snapshot_outside(under_test) == before, "the daemon wrote outside its configured folders"


# --------------------------------------------------------------------------- helpers


def write_into(folder: Path, name: str, data: bytes) -> Path:
    """Put a file into an inbox atomically (temp name, then rename)."""
    target = folder / name
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = folder / f".{name}.part"
    temp.write_bytes(data)
    os.rename(temp, target)
    return target


def wait_ended(daemon: DaemonUnderTest, rel_path: str, timeout: float = 120.0) -> Job:
    """The job once it ended and its source was moved (or found gone)."""

    def ended() -> bool:
        job = daemon.job_for(rel_path)
        return job is not None and not job.state.is_active and job.disposed_at is not None

    daemon.wait_for(ended, timeout=timeout, what=f"{rel_path!r} ended and moved")
    job = daemon.job_for(rel_path)
    assert job is not None
    return job


def jobs_for(daemon: DaemonUnderTest, rel_path: str) -> list[Job]:
    return [job for job in daemon.jobs() if job.spec.rel_path == rel_path]


def outputs_named(output: Path, stem: str) -> list[str]:
    return sorted(p.name for p in output.iterdir() if p.name.startswith(stem))


def assert_failed(daemon: DaemonUnderTest, name: str, reason: str, *, inbox: str = "main") -> Job:
    """Failed with `reason`, the source moved to failed/ with NAME.error.txt, no outputs."""
    job = wait_ended(daemon, name)
    where = folders(daemon, inbox)
    assert job.state is JobState.FAILED, f"{name!r}: {job.state.value} ({job.last_error})"
    assert job.last_error is not None and reason in job.last_error
    assert [j.id for j in jobs_for(daemon, name)] == [job.id]
    assert os.path.lexists(where["failed"] / name) and not os.path.lexists(where["path"] / name)
    note = (where["failed"] / f"{name}.error.txt").read_text(encoding="utf-8")
    assert reason in note
    assert outputs_named(where["output"], Path(name).stem) == []
    return job


def assert_done(daemon: DaemonUnderTest, name: str, *, inbox: str = "main") -> Job:
    """Done once, all outputs there, the source moved to done/."""
    job = wait_ended(daemon, name)
    where = folders(daemon, inbox)
    assert job.state is JobState.DONE, f"{name!r}: {job.state.value} ({job.last_error})"
    assert [j.id for j in jobs_for(daemon, name)] == [job.id]
    assert job.attempts == 1
    stem = os.path.splitext(name)[0]
    assert sorted(Path(p).name for p in job.outputs) == [
        f"{stem}.{f}" for f in ("json", "srt", "tsv", "txt", "vtt")
    ]
    assert all(Path(p).is_file() for p in job.outputs)
    assert os.path.lexists(where["done"] / name) and not os.path.lexists(where["path"] / name)
    assert not list(daemon.root.rglob(f"*{TMP_MARKER}"))
    return job


def transcript(job: Job) -> str:
    txt = next(p for p in job.outputs if p.endswith(".txt"))
    return Path(txt).read_text(encoding="utf-8")


def keep_worker_busy(daemon: DaemonUnderTest, clips: ClipFactory, name: str) -> None:
    """Start a minute-long job on the only worker and wait until it runs."""
    daemon.drop(clips(BUSY_TEXT, name))
    daemon.wait_for_state(f"{name}.wav", JobState.RUNNING)


@contextmanager
def claims_paused(daemon: DaemonUnderTest, inbox: str = "main") -> Iterator[None]:
    """No worker starts a queued job of `inbox` meanwhile (the running one
    goes on): a file dropped now stays queued however soon the busy job ends
    on a loaded machine."""
    daemon.store.pause_inbox(inbox)
    try:
        yield
    finally:
        daemon.store.resume_inbox(inbox)


def assert_still_queued_behind(daemon: DaemonUnderTest, name: str, busy: str) -> None:
    """The premise of a "before it runs" test: the change came while queued
    (held there by claims_paused, not by timing), behind a job that ran."""
    job, running = daemon.job_for(name), daemon.job_for(busy)
    assert job is not None and job.state is JobState.QUEUED, "the worker took the file too early"
    assert running is not None and running.attempts == 1 and running.started_at is not None


# --------------------------------------------------------------------------- broken media


def test_empty_file_fails_saying_it_is_empty(daemon: DaemonUnderTest) -> None:
    write_into(folders(daemon)["path"], "empty.wav", b"")
    job = assert_failed(daemon, "empty.wav", "file is empty")
    assert "empty.wav" in (job.last_error or "")


def test_text_file_named_mp3_fails_as_not_media(daemon: DaemonUnderTest) -> None:
    write_into(folders(daemon)["path"], "notes.mp3", b"meeting notes, not audio at all\n" * 40)
    job = assert_failed(daemon, "notes.mp3", "not a media file")
    assert "notes.mp3" in (job.last_error or "")


def test_truncated_mp4_fails_with_ffmpegs_reason(daemon: DaemonUnderTest, clips: ClipFactory) -> None:
    whole = clips(SENTENCES[0], "cut-video", "mp4").read_bytes()
    write_into(folders(daemon)["path"], "cut-video.mp4", whole[: len(whole) // 2])
    assert_failed(daemon, "cut-video.mp4", "moov atom not found")


def test_truncated_mp3_transcribes_what_survives(daemon: DaemonUnderTest, clips: ClipFactory) -> None:
    """An mp3 is a stream of frames: the part before the cut is still speech."""
    whole = clips(SENTENCES[1], "cut-audio", "mp3").read_bytes()
    write_into(folders(daemon)["path"], "cut-audio.mp3", whole[: len(whole) * 4 // 10])
    job = assert_done(daemon, "cut-audio.mp3")
    assert job.audio_seconds is not None and 1.0 < job.audio_seconds < 8.0
    assert {"remember", "kitchen"} & set(transcript(job).lower().split())


def test_folder_named_like_media_is_not_a_job_and_stays(daemon: DaemonUnderTest) -> None:
    inbox = folders(daemon)["path"]
    (inbox / "x.wav").mkdir()
    # A file dropped after the folder: once it is handled, so was the folder.
    write_into(inbox, "after-folder.wav", b"")
    assert_failed(daemon, "after-folder.wav", "file is empty")
    daemon.wait_for_rescans(1)  # and a rescan has walked the inbox

    assert daemon.job_for("x.wav") is None
    assert (inbox / "x.wav").is_dir()
    (inbox / "x.wav").rmdir()


def test_unreadable_file_fails_with_permission_denied(
    daemon: DaemonUnderTest, clips: ClipFactory, unprivileged: list[str] | None
) -> None:
    if unprivileged is None:
        pytest.skip("running as root without setpriv: root reads any file, so none is unreadable")
    inbox = folders(daemon)["path"]
    locked = write_into(inbox, "locked.wav", clips(SHORT_TEXT, "locked").read_bytes())
    locked.chmod(0)
    job = assert_failed(daemon, "locked.wav", "permission denied")
    assert "locked.wav" in (job.last_error or "")


# --------------------------------------------------------------------------- files that change


def test_file_deleted_before_it_runs_fails_as_vanished(daemon: DaemonUnderTest, clips: ClipFactory) -> None:
    keep_worker_busy(daemon, clips, "busy-one")
    with claims_paused(daemon):
        victim = daemon.drop(clips(SHORT_TEXT, "gone"))
        daemon.wait_for_state("gone.wav", JobState.QUEUED, JobState.RUNNING)
        victim.unlink()
        daemon.wait_for_rescans(1)  # whatever the daemon makes of it, it does while queued
        assert_still_queued_behind(daemon, "gone.wav", "busy-one.wav")

    job = wait_ended(daemon, "gone.wav")
    assert job.state is JobState.FAILED
    assert "vanished" in (job.last_error or "") and "gone.wav" in (job.last_error or "")
    assert "vanished" in (folders(daemon)["failed"] / "gone.wav.error.txt").read_text(encoding="utf-8")
    assert outputs_named(folders(daemon)["output"], "gone") == []
    assert_done(daemon, "busy-one.wav")


def test_file_replaced_before_it_runs_is_transcribed_as_replaced_once(
    daemon: DaemonUnderTest, clips: ClipFactory
) -> None:
    keep_worker_busy(daemon, clips, "busy-two")
    inbox = folders(daemon)["path"]
    with claims_paused(daemon):
        daemon.drop(clips(SENTENCES[0], "swap"))
        daemon.wait_for_state("swap.wav", JobState.QUEUED, JobState.RUNNING)
        replacement = clips(SENTENCES[3], "swap-replacement").read_bytes()
        write_into(inbox, "swap.wav", replacement)
        daemon.wait_for_rescans(1)  # whatever the daemon makes of it, it does while queued
        assert_still_queued_behind(daemon, "swap.wav", "busy-two.wav")

    job = assert_done(daemon, "swap.wav")
    assert wer(SENTENCES[3], transcript(job)) < 0.5
    assert (folders(daemon)["done"] / "swap.wav").read_bytes() == replacement
    assert_done(daemon, "busy-two.wav")
    # Rescans must not find anything left to do for it.
    daemon.wait_for_rescans(1)
    assert len(jobs_for(daemon, "swap.wav")) == 1


def test_file_replaced_while_it_runs_gets_a_job_of_its_own_afterwards(
    daemon: DaemonUnderTest, clips: ClipFactory
) -> None:
    inbox = folders(daemon)["path"]
    daemon.drop(clips(BUSY_TEXT, "relay"))
    first = daemon.wait_for_state("relay.wav", JobState.RUNNING)
    replacement = clips(SENTENCES[2], "relay-replacement").read_bytes()
    write_into(inbox, "relay.wav", replacement)

    # The running job transcribes what it opened; the new file is not lost:
    # once that job ends it becomes a job of its own.
    def two_jobs_done() -> bool:
        jobs = jobs_for(daemon, "relay.wav")
        # Done and moved: the worker records done first and moves the source after.
        return len(jobs) == 2 and all(j.state is JobState.DONE and j.disposed_at for j in jobs)

    daemon.wait_for(two_jobs_done, timeout=240, what="the replacement's own job to end done")
    newest = max(jobs_for(daemon, "relay.wav"), key=lambda j: j.id)
    assert newest.id != first.id
    assert wer(SENTENCES[2], transcript(newest)) < 0.5
    assert not os.path.lexists(inbox / "relay.wav")
    # The first file was unlinked by the replacing rename; only the new one is left to move.
    done = folders(daemon)["done"]
    assert sorted(p.name for p in done.glob("relay*.wav")) == ["relay.wav"]
    assert (done / "relay.wav").read_bytes() == replacement


def test_file_written_slowly_becomes_one_job_with_its_final_size(
    daemon: DaemonUnderTest, clips: ClipFactory
) -> None:
    data = clips(SENTENCES[4], "slow").read_bytes()
    target = folders(daemon)["path"] / "slow.wav"
    chunks = 12
    step = len(data) // chunks + 1
    with target.open("wb") as out:  # written in place, no temp name: ~3 s of appends
        for start in range(0, len(data), step):
            out.write(data[start : start + step])
            out.flush()
            time.sleep(0.25)

    job = assert_done(daemon, "slow.wav")
    assert job.identity.size == len(data)
    assert wer(SENTENCES[4], transcript(job)) < 0.5


# --------------------------------------------------------------------------- names

ODD_NAMES = [
    "my talk with spaces.wav",
    "café Überraschung 日本語.wav",
    "line\nbreak.wav",
    "-rf.wav",
    "concat:evil.wav",
    "http:evil.wav",
]


def test_odd_file_names_are_transcribed_normally(daemon: DaemonUnderTest, clips: ClipFactory) -> None:
    audio = clips(SHORT_TEXT, "odd").read_bytes()
    inbox = folders(daemon)["path"]
    for name in ODD_NAMES:
        write_into(inbox, name, audio)

    for name in ODD_NAMES:
        job = assert_done(daemon, name)
        assert wer(SHORT_TEXT, transcript(job)) < 0.5, name


# --------------------------------------------------------------------------- symbolic links


def _outside_target(clips: ClipFactory, name: str) -> tuple[Path, tuple[int, int, bytes]]:
    target = clips(SHORT_TEXT, name)
    st = target.stat()
    return target, (st.st_size, st.st_mtime_ns, target.read_bytes())


def _unchanged(target: Path, before: tuple[int, int, bytes]) -> bool:
    st = target.stat()
    return (st.st_size, st.st_mtime_ns, target.read_bytes()) == before


def test_symlink_is_refused_and_the_link_not_its_target_moves(
    daemon: DaemonUnderTest, clips: ClipFactory
) -> None:
    target, before = _outside_target(clips, "link-target")
    where = folders(daemon)
    (where["path"] / "link.wav").symlink_to(target)

    assert_failed(daemon, "link.wav", REASON_SYMLINK_REFUSED)
    moved = where["failed"] / "link.wav"
    assert moved.is_symlink() and os.readlink(moved) == str(target)
    assert _unchanged(target, before)


def test_allowed_symlink_inside_the_inbox_is_transcribed(daemon: DaemonUnderTest, clips: ClipFactory) -> None:
    where = folders(daemon, "links")
    # A dotfile is never a job itself; the link to it is.
    real = write_into(where["path"], ".kept-inside.wav", clips(SHORT_TEXT, "inside").read_bytes())
    before = (real.stat().st_size, real.stat().st_mtime_ns, real.read_bytes())
    (where["path"] / "inside-link.wav").symlink_to(real)

    job = assert_done(daemon, "inside-link.wav", inbox="links")
    assert wer(SHORT_TEXT, transcript(job)) < 0.5
    assert (where["done"] / "inside-link.wav").is_symlink()
    assert _unchanged(real, before)
    real.unlink()


def test_allowed_symlink_pointing_outside_is_refused(daemon: DaemonUnderTest, clips: ClipFactory) -> None:
    target, before = _outside_target(clips, "escape-target")
    where = folders(daemon, "links")
    (where["path"] / "escape.wav").symlink_to(target)

    assert_failed(daemon, "escape.wav", REASON_SYMLINK_OUTSIDE, inbox="links")
    assert (where["failed"] / "escape.wav").is_symlink()
    assert _unchanged(target, before)


# --------------------------------------------------------------------------- limits


def test_file_over_max_size_fails_naming_the_limit(daemon: DaemonUnderTest, clips: ClipFactory) -> None:
    write_into(folders(daemon, "small")["path"], "big.wav", clips(SHORT_TEXT, "big").read_bytes())
    job = assert_failed(daemon, "big.wav", f"over the inbox limit of {SIZE_LIMIT_MB:g} MB", inbox="small")
    assert "big.wav" in (job.last_error or "")


def test_file_over_max_duration_fails_naming_the_limit(daemon: DaemonUnderTest, clips: ClipFactory) -> None:
    write_into(folders(daemon, "short")["path"], "long.mp3", clips(SENTENCES[2], "long", "mp3").read_bytes())
    reason = f"over the inbox limit of {DURATION_LIMIT_SECONDS:g} s"
    job = assert_failed(daemon, "long.mp3", reason, inbox="short")
    assert "long.mp3" in (job.last_error or "")


def _flac_hiding_its_length(path: Path, seconds: float) -> Path:
    """A FLAC whose STREAMINFO says 0 samples (unknown length): ffprobe
    reports no duration, so only the decode itself can find out."""
    tone = f"sine=frequency=440:duration={seconds}"
    argv = ["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i", tone, "-ar", "16000", "-y", str(path)]
    subprocess.run(argv, check=True)
    data = bytearray(path.read_bytes())
    assert data[:4] == b"fLaC"
    # STREAMINFO follows "fLaC" and its 4-byte block header; the total sample
    # count is the low 36 bits of its bytes 10-17.
    data[21] &= 0xF0
    data[22:26] = bytes(4)
    path.write_bytes(bytes(data))
    return path


def test_audio_that_hides_its_length_is_stopped_at_the_limit_while_decoding(
    daemon: DaemonUnderTest, tmp_path: Path
) -> None:
    hidden = _flac_hiding_its_length(tmp_path / "hidden.flac", 10 * DURATION_LIMIT_SECONDS)
    probe = subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0", str(hidden)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.strip() in ("", "N/A"), "the container still declares its length"
    write_into(folders(daemon, "short")["path"], "hidden.flac", hidden.read_bytes())
    reason = f"audio is longer than {DURATION_LIMIT_SECONDS:g} s"
    job = assert_failed(daemon, "hidden.flac", reason, inbox="short")
    assert "hidden.flac" in (job.last_error or "")


# --------------------------------------------------------------------------- a full disk


def _can_mount_privately() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--", "mount", "-t", "tmpfs", "none", "/mnt"],
        capture_output=True,
        check=False,
    )
    return probe.returncode == 0


def test_full_output_disk_fails_the_job_saying_disk_full_and_leaves_nothing(
    tmp_path: Path, models_dir: Path, clips: ClipFactory
) -> None:
    if not _can_mount_privately():
        pytest.skip("needs root and `unshare --mount` to put the output folder on a tiny tmpfs")
    inbox = DaemonUnderTest.default_inbox(tmp_path)
    output = Path(inbox["output"])
    output.mkdir(parents=True)
    # Two 4 KiB pages: the first outputs fit, a later one hits ENOSPC.
    mount = 'mount -t tmpfs -o size=8k whisperd-test "$0" && exec "$@"'
    wrapper = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", mount, str(output)]
    full = WrappedDaemon(tmp_path, models_dir, wrapper=wrapper, inboxes=[inbox], workers={"max_attempts": 2})
    try:
        before = snapshot_outside(full)
        full.start()
        assert full.process is not None
        seen_by_daemon = Path(f"/proc/{full.process.pid}/root{output}")
        full.drop(clips(SHORT_TEXT, "full"))

        job = wait_ended(full, "full.wav")
        assert job.state is JobState.FAILED and job.attempts == 2
        assert "disk full" in (job.last_error or "")
        assert full.events("job.retry"), "the first failure is retried"
        assert sorted(os.listdir(seen_by_daemon)) == []  # no partial outputs, no temp files
        assert (full.failed / "full.wav").exists()
        assert "disk full" in (full.failed / "full.wav.error.txt").read_text(encoding="utf-8")
        assert full.stop() == 0
        assert snapshot_outside(full) == before
    finally:
        full.close()
