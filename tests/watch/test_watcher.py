"""The watcher against real folders and real watchdog observers (inotify and polling)."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from whisperd.jobs import FileIdentity
from whisperd.watch.rules import (
    REASON_SYMLINK_OUTSIDE,
    REASON_SYMLINK_REFUSED,
    WatchSpec,
    is_candidate_name,
    unsupported_reason,
)
from whisperd.watch.watcher import Watcher

pytestmark = pytest.mark.timeout(60)

SETTLE = 0.3
WAIT = 15.0  # generous: the machine is shared
MODES = ["native", "poll"]


def wait_for(predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


@dataclass
class Recorder:
    """Collects callbacks from the settle thread."""

    settled: list[tuple[str, str, FileIdentity, float]] = field(default_factory=list)
    cancels: list[tuple[str, str, FileIdentity]] = field(default_factory=list)
    rejected: list[tuple[str, str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_settled(self, spec: WatchSpec, path: str, identity: FileIdentity) -> None:
        with self.lock:
            self.settled.append((spec.name, path, identity, time.monotonic()))

    def on_cancel(self, spec: WatchSpec, path: str, identity: FileIdentity) -> None:
        with self.lock:
            self.cancels.append((spec.name, path, identity))

    def on_rejected(self, spec: WatchSpec, path: str, reason: str) -> None:
        with self.lock:
            self.rejected.append((spec.name, path, reason))

    def settled_paths(self) -> list[str]:
        with self.lock:
            return [path for _, path, _, _ in self.settled]

    def wait_settled(self, path: Path) -> bool:
        return wait_for(lambda: str(path) in self.settled_paths())


@dataclass
class Inbox:
    root: Path
    cancel: Path
    spec: WatchSpec


def make_inbox(base: Path, name: str = "main", **spec_options: object) -> Inbox:
    root = base / name / "inbox"
    cancel = base / name / "cancel"
    root.mkdir(parents=True)
    cancel.mkdir(parents=True)
    spec = WatchSpec(name=name, root=str(root), cancel_dir=str(cancel), **spec_options)  # type: ignore[arg-type]
    return Inbox(root=root, cancel=cancel, spec=spec)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def watchers() -> Iterator[list[Watcher]]:
    """Watchers made by a test; every one is stopped at the end."""
    made: list[Watcher] = []
    yield made
    for watcher in made:
        watcher.stop(timeout=5)


@pytest.fixture
def new_watcher(recorder: Recorder, watchers: list[Watcher]) -> Callable[..., Watcher]:
    def build(
        specs: list[WatchSpec], *, settle: float = SETTLE, rescan: float = 0.0, **kw: object
    ) -> Watcher:
        watcher = Watcher(
            specs,
            settle_seconds=settle,
            rescan_seconds=rescan,
            on_settled=recorder.on_settled,
            on_cancel=recorder.on_cancel,
            on_rejected=recorder.on_rejected,
            **kw,  # type: ignore[arg-type]
        )
        watchers.append(watcher)
        return watcher

    return build


def drop(path: Path, data: bytes = b"RIFF....WAVEfmt ") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def spec_with_mode(base: Path, mode: str, **options: Any) -> Inbox:
    return make_inbox(base, mode=mode, poll_interval=0.2, **options)


# ----------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("talk.wav", True),
        ("Talk.MP3", True),
        ("clip.webm", True),
        ("movie.mkv", True),
        ("notes.txt", False),
        ("noext", False),
        ("talk.wav.part", False),
        ("talk.mp3.crdownload", False),
        ("talk.wav.tmp", False),
        ("talk.wav.partial", False),
        ("talk.wav.download", False),
        ("talk.wav~", False),
        (".talk.wav", False),
        ("talk.whisperd-tmp.wav", False),
        ("/some/folder/talk.flac", True),
    ],
)
def test_candidate_names(name: str, expected: bool) -> None:
    assert is_candidate_name(name) is expected


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("report.docx", "unsupported extension .docx"),
        ("NOTES.TXT", "unsupported extension .txt"),
        ("noext", "unsupported extension (none)"),
        ("talk.wav", None),  # media: taken
        ("talk.wav.part", None),  # still being written: waits for its rename
        (".hidden.pdf", None),
        ("backup.doc~", None),
    ],
)
def test_files_that_are_not_media_say_why(name: str, reason: str | None) -> None:
    assert unsupported_reason(name) == reason


def test_bad_specs_are_refused_naming_the_inbox(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="inbox 'a': root must be an absolute path"):
        WatchSpec(name="a", root="relative/inbox", cancel_dir=str(tmp_path))
    with pytest.raises(ValueError, match="inbox 'a': mode must be"):
        WatchSpec(name="a", root=str(tmp_path), cancel_dir=str(tmp_path / "c"), mode="fast")
    spec = WatchSpec(name="a", root=str(tmp_path / "i"), cancel_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="inbox 'a' is listed twice"):
        Watcher(
            [spec, spec],
            settle_seconds=1,
            rescan_seconds=0,
            on_settled=lambda *a: None,
            on_cancel=lambda *a: None,
            on_rejected=lambda *a: None,
        )


# ----------------------------------------------------------------- settling, stepped by hand


def test_settling_needs_an_unchanged_file_for_the_whole_period(
    tmp_path: Path, recorder: Recorder, new_watcher: Callable[..., Watcher]
) -> None:
    inbox = make_inbox(tmp_path)
    watcher = new_watcher([inbox.spec], settle=1.0)
    watcher.start(observe=False, run_loop=False)
    talk = drop(inbox.root / "talk.wav", b"a" * 100)
    watcher.rescan()

    watcher.step(now=100.0)  # first look
    watcher.step(now=100.9)
    assert recorder.settled == []

    with talk.open("ab") as f:  # still being written
        f.write(b"b" * 50)
    watcher.step(now=101.0)  # changed: the clock starts again
    watcher.step(now=101.9)
    assert recorder.settled == []

    watcher.step(now=102.0)
    assert [(p, ident.size) for _, p, ident, _ in recorder.settled] == [(str(talk), 150)]

    # Unchanged file found again by a rescan: not delivered twice.
    watcher.rescan()
    watcher.step(now=103.0)
    watcher.step(now=105.0)
    assert len(recorder.settled) == 1

    # The job moved it away; the same name dropped again is a new job.
    talk.rename(tmp_path / "done.wav")
    watcher.rescan()
    drop(talk, b"c" * 10)
    watcher.rescan()
    watcher.step(now=106.0)
    watcher.step(now=107.0)
    assert [(p, ident.size) for _, p, ident, _ in recorder.settled][-1] == (str(talk), 10)
    assert len(recorder.settled) == 2


def test_a_failing_callback_is_logged_and_offered_again_at_the_next_rescan(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    inbox = make_inbox(tmp_path)
    calls: list[str] = []

    def flaky(spec: WatchSpec, path: str, identity: FileIdentity) -> None:
        calls.append(path)
        if len(calls) == 1:
            raise RuntimeError("job store is down")

    watcher = Watcher(
        [inbox.spec],
        settle_seconds=1.0,
        rescan_seconds=0,
        on_settled=flaky,
        on_cancel=lambda *a: None,
        on_rejected=lambda *a: None,
    )
    watcher.start(observe=False, run_loop=False)
    talk = drop(inbox.root / "talk.wav")
    watcher.rescan()
    watcher.step(now=0.0)
    watcher.step(now=1.0)
    assert calls == [str(talk)]
    assert "job store is down" in caplog.text
    assert str(talk) in caplog.text

    watcher.rescan()
    watcher.step(now=2.0)
    watcher.step(now=3.0)
    assert calls == [str(talk), str(talk)]
    watcher.stop()


# ----------------------------------------------------------------- real observers


@pytest.mark.parametrize("mode", MODES)
def test_a_dropped_file_is_delivered_once_after_settling(
    tmp_path: Path, mode: str, recorder: Recorder, new_watcher: Callable[..., Watcher]
) -> None:
    inbox = spec_with_mode(tmp_path, mode)
    # Frequent rescans: they must not deliver an unchanged file again either.
    watcher = new_watcher([inbox.spec], rescan=0.2)
    watcher.start()
    talk = drop(inbox.root / "talk.wav", b"x" * 1234)
    assert recorder.wait_settled(talk)
    # (That it waited for the settle period first is shown, on a stepped clock,
    # by test_settling_needs_an_unchanged_file_for_the_whole_period.)
    name, path, identity, _ = recorder.settled[0]
    assert (name, path, identity.size) == ("main", str(talk), 1234)
    assert identity == FileIdentity.of(str(talk))

    # Events for an unchanged file (a chmod, a read) must not deliver it again.
    talk.chmod(0o640)
    with talk.open("rb") as f:
        f.read()
    # A later file as a barrier: by the time it has settled, a duplicate of the first would have come.
    later = drop(inbox.root / "later.wav")
    assert recorder.wait_settled(later)
    assert recorder.settled_paths() == [str(talk), str(later)]
    assert watcher.events_seen.get("created", 0) >= 2
    assert watcher.last_rescan is not None


@pytest.mark.parametrize("mode", MODES)
def test_a_slowly_written_file_is_delivered_once_when_writing_stopped(
    tmp_path: Path, mode: str, recorder: Recorder, new_watcher: Callable[..., Watcher]
) -> None:
    inbox = spec_with_mode(tmp_path, mode)
    # The writer pauses 0.2 s between chunks; the settle period is far longer,
    # so a writer thread held up on a loaded machine is not taken for done.
    watcher = new_watcher([inbox.spec], settle=3.0)
    watcher.start()
    talk = inbox.root / "slow.wav"
    finished = threading.Event()
    finished_at: list[float] = []

    def write_slowly() -> None:
        with talk.open("wb") as f:
            for _ in range(10):
                f.write(b"z" * 1000)
                f.flush()
                if finished.wait(0.2):
                    break
        finished_at.append(time.monotonic())

    writer = threading.Thread(target=write_slowly)
    writer.start()
    try:
        assert recorder.wait_settled(talk)
    finally:
        finished.set()
        writer.join()
    _, _, identity, delivered_at = recorder.settled[0]
    assert identity.size == 10_000
    assert delivered_at >= finished_at[0]

    later = drop(inbox.root / "later.wav")
    assert recorder.wait_settled(later)
    assert recorder.settled_paths() == [str(talk), str(later)]


@pytest.mark.parametrize("mode", MODES)
def test_temporary_names_are_ignored_until_renamed(
    tmp_path: Path, mode: str, recorder: Recorder, new_watcher: Callable[..., Watcher]
) -> None:
    inbox = spec_with_mode(tmp_path, mode)
    watcher = new_watcher([inbox.spec], rescan=0.2)
    watcher.start()
    partial = drop(inbox.root / "talk.wav.part")
    hidden = drop(inbox.root / ".talk.wav")
    barrier = drop(inbox.root / "barrier.wav")
    assert recorder.wait_settled(barrier)
    assert recorder.settled_paths() == [str(barrier)]

    final = inbox.root / "talk.wav"
    partial.rename(final)
    hidden.unlink()
    assert recorder.wait_settled(final)
    assert recorder.settled_paths() == [str(barrier), str(final)]


def test_files_present_before_start_are_delivered(
    tmp_path: Path, recorder: Recorder, new_watcher: Callable[..., Watcher]
) -> None:
    inbox = make_inbox(tmp_path)
    first = drop(inbox.root / "first.mp3")
    nested = drop(inbox.root / "team" / "2024" / "nested.m4a")
    watcher = new_watcher([inbox.spec])
    watcher.start()
    assert recorder.wait_settled(first)
    assert recorder.wait_settled(nested)
    assert sorted(recorder.settled_paths()) == sorted([str(first), str(nested)])


@pytest.mark.parametrize("mode", MODES)
def test_files_in_new_and_moved_in_subfolders_are_delivered(
    tmp_path: Path, mode: str, recorder: Recorder, new_watcher: Callable[..., Watcher]
) -> None:
    inbox = spec_with_mode(tmp_path, mode)
    watcher = new_watcher([inbox.spec])
    watcher.start()
    nested = drop(inbox.root / "a" / "b" / "deep.ogg")

    # A folder prepared elsewhere and moved in brings its files along.
    outside = tmp_path / "prepared"
    drop(outside / "one.wav")
    drop(outside / "sub" / "two.wav")
    outside.rename(inbox.root / "batch")

    expected = [nested, inbox.root / "batch" / "one.wav", inbox.root / "batch" / "sub" / "two.wav"]
    for path in expected:
        assert recorder.wait_settled(path)
    assert sorted(recorder.settled_paths()) == sorted(str(p) for p in expected)


def test_a_folder_named_like_media_is_ignored(
    tmp_path: Path, recorder: Recorder, new_watcher: Callable[..., Watcher]
) -> None:
    inbox = make_inbox(tmp_path)
    watcher = new_watcher([inbox.spec], rescan=0.2)
    watcher.start()
    (inbox.root / "folder.wav").mkdir()
    inside = drop(inbox.root / "folder.wav" / "inside.wav")
    assert recorder.wait_settled(inside)
    barrier = drop(inbox.root / "barrier.wav")
    assert recorder.wait_settled(barrier)
    assert sorted(recorder.settled_paths()) == sorted([str(inside), str(barrier)])
    assert recorder.rejected == []


@pytest.mark.parametrize("mode", MODES)
def test_symlinks_are_refused_with_a_reason_once(
    tmp_path: Path, mode: str, recorder: Recorder, new_watcher: Callable[..., Watcher]
) -> None:
    inbox = spec_with_mode(tmp_path, mode)
    real = drop(tmp_path / "elsewhere.wav")
    watcher = new_watcher([inbox.spec], rescan=0.2)
    watcher.start()
    link = inbox.root / "link.wav"
    link.symlink_to(real)
    assert wait_for(lambda: recorder.rejected != [])
    barrier = drop(inbox.root / "barrier.wav")
    assert recorder.wait_settled(barrier)
    assert recorder.rejected == [("main", str(link), REASON_SYMLINK_REFUSED)]
    assert recorder.settled_paths() == [str(barrier)]


def test_an_allowed_symlink_inside_the_inbox_is_accepted(
    tmp_path: Path, recorder: Recorder, new_watcher: Callable[..., Watcher]
) -> None:
    inbox = make_inbox(tmp_path, allow_symlinks=True)
    # The target does not look like media, so only the link can be delivered.
    target = drop(inbox.root / "store" / "raw-recording.bin", b"q" * 77)
    watcher = new_watcher([inbox.spec])
    watcher.start()
    link = inbox.root / "talk.wav"
    link.symlink_to(target)
    assert recorder.wait_settled(link)
    _, _, identity, _ = recorder.settled[0]
    assert identity == FileIdentity.of(str(target))  # the target's identity, not the link's
    # Only the target (not a media name) is reported, as an unsupported extension.
    assert [(path, reason) for _, path, reason in recorder.rejected] in (
        [],
        [(str(target), "unsupported extension .bin")],
    )


def test_an_allowed_symlink_pointing_outside_is_refused(
    tmp_path: Path, recorder: Recorder, new_watcher: Callable[..., Watcher]
) -> None:
    inbox = make_inbox(tmp_path, allow_symlinks=True)
    outside = drop(tmp_path / "secret.wav")
    watcher = new_watcher([inbox.spec])
    watcher.start()
    link = inbox.root / "sneaky.wav"
    link.symlink_to(Path("..") / ".." / "secret.wav")  # relative, resolved out of the root
    assert wait_for(lambda: recorder.rejected != [])
    assert recorder.rejected == [("main", str(link), REASON_SYMLINK_OUTSIDE)]
    assert outside.exists()
    barrier = drop(inbox.root / "barrier.wav")
    assert recorder.wait_settled(barrier)
    assert recorder.settled_paths() == [str(barrier)]


@pytest.mark.parametrize("mode", MODES)
def test_a_copy_into_the_cancel_folder_is_a_cancel(
    tmp_path: Path, mode: str, recorder: Recorder, new_watcher: Callable[..., Watcher]
) -> None:
    inbox = spec_with_mode(tmp_path, mode)
    watcher = new_watcher([inbox.spec])
    watcher.start()
    talk = drop(inbox.root / "talk.wav", b"w" * 500)
    assert recorder.wait_settled(talk)
    copy = inbox.cancel / "talk.wav"
    shutil.copy2(talk, copy)
    assert wait_for(lambda: recorder.cancels != [])
    name, path, identity = recorder.cancels[0]
    assert (name, path) == ("main", str(copy))
    assert identity.same_content(FileIdentity.of(str(talk)))
    assert recorder.settled_paths() == [str(talk)]

    # Moving a file from the inbox into the cancel folder works the same way.
    other = drop(inbox.root / "sub" / "other.wav")
    assert recorder.wait_settled(other)
    moved = inbox.cancel / "other.wav"
    other.rename(moved)
    assert wait_for(lambda: len(recorder.cancels) == 2)
    assert recorder.cancels[1][1] == str(moved)


# ----------------------------------------------------------------- rescans and dead observers


def test_a_periodic_rescan_finds_files_without_any_event(
    tmp_path: Path, recorder: Recorder, new_watcher: Callable[..., Watcher]
) -> None:
    inbox = make_inbox(tmp_path)
    watcher = new_watcher([inbox.spec], rescan=0.3)
    watcher.start(observe=False)  # no observer: only rescans can see the file
    talk = drop(inbox.root / "talk.wav")
    assert recorder.wait_settled(talk)
    assert watcher.events_seen == {}


def test_a_manual_rescan_finds_a_missed_file(
    tmp_path: Path, recorder: Recorder, new_watcher: Callable[..., Watcher]
) -> None:
    inbox = make_inbox(tmp_path)
    watcher = new_watcher([inbox.spec], rescan=0.0)
    watcher.start(observe=False)
    before = watcher.last_rescan
    talk = drop(inbox.root / "talk.wav")
    watcher.rescan()
    assert recorder.wait_settled(talk)
    assert watcher.last_rescan is not None and before is not None and watcher.last_rescan > before


def test_a_dead_inbox_is_reported_and_revived_by_a_rescan(
    tmp_path: Path, recorder: Recorder, new_watcher: Callable[..., Watcher]
) -> None:
    inbox = make_inbox(tmp_path)
    watcher = new_watcher([inbox.spec], rescan=0.0)
    watcher.start()
    assert watcher.dead_inboxes() == []

    shutil.rmtree(inbox.root)
    assert wait_for(lambda: watcher.dead_inboxes() == ["main"])
    watcher.rescan()  # the folder is not created by the watcher
    assert not inbox.root.exists()
    assert watcher.dead_inboxes() == ["main"]

    inbox.root.mkdir()
    watcher.rescan()
    assert watcher.dead_inboxes() == []
    # With periodic rescans off, only the revived observer can see this file.
    talk = drop(inbox.root / "back.wav")
    assert recorder.wait_settled(talk)


def test_set_specs_adds_and_removes_inboxes(
    tmp_path: Path, recorder: Recorder, new_watcher: Callable[..., Watcher]
) -> None:
    first = make_inbox(tmp_path, "first")
    second = make_inbox(tmp_path, "second")
    waiting = drop(second.root / "waiting.wav")
    watcher = new_watcher([first.spec])
    watcher.start()
    a1 = drop(first.root / "a1.wav")
    assert recorder.wait_settled(a1)

    watcher.set_specs([first.spec, second.spec])
    assert recorder.wait_settled(waiting)  # already there when the inbox was added
    b1 = drop(second.root / "b1.wav")
    assert recorder.wait_settled(b1)
    a2 = drop(first.root / "a2.wav")
    assert recorder.wait_settled(a2)  # the first inbox kept working
    assert [name for name, _, _, _ in recorder.settled].count("second") == 2

    watcher.set_specs([second.spec])
    assert not any(t.name == "whisperd-watch-first" for t in threading.enumerate())
    ignored = drop(first.root / "ignored.wav")
    b2 = drop(second.root / "b2.wav")
    assert recorder.wait_settled(b2)
    assert str(ignored) not in recorder.settled_paths()
    assert watcher.dead_inboxes() == []


@pytest.mark.parametrize("mode", MODES)
def test_stop_joins_every_thread(tmp_path: Path, mode: str, recorder: Recorder) -> None:
    before = set(threading.enumerate())
    inboxes = [spec_with_mode(tmp_path, mode), make_inbox(tmp_path, "second")]
    watcher = Watcher(
        [i.spec for i in inboxes],
        settle_seconds=SETTLE,
        rescan_seconds=0.2,
        on_settled=recorder.on_settled,
        on_cancel=recorder.on_cancel,
        on_rejected=recorder.on_rejected,
    )
    watcher.start()
    talk = drop(inboxes[0].root / "talk.wav")
    assert recorder.wait_settled(talk)
    assert len(set(threading.enumerate()) - before) >= 3  # settle thread + an observer per inbox

    watcher.stop(timeout=5.0)
    assert not watcher.is_alive()
    assert set(threading.enumerate()) - before == set()
