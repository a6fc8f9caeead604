"""whisperd.media.decode against real files made by espeak-ng and ffmpeg, and the real ffmpeg/ffprobe."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import subprocess
import tempfile
import wave
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import require_tool
from whisperd.errors import MediaError
from whisperd.media import decode as media
from whisperd.media import tool as media_tool
from whisperd.media.decode import SAMPLE_RATE

SPOKEN_TEXT = "Please write down every word of this short sentence about the weather."
# Encoders add priming and padding, and video containers round to frames.
LENGTH_TOLERANCE_SECONDS = 0.1
NOBODY_UID = 65534


def _ffmpeg(*args: str) -> None:
    require_tool("ffmpeg", "ffmpeg")
    subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-v", "error", "-y", *args], check=True)


def _speak(path: Path, text: str = SPOKEN_TEXT) -> Path:
    require_tool("espeak-ng", "espeak-ng")
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True)
    return path


def _tone(path: Path, seconds: float, frequency: int = 440) -> Path:
    _ffmpeg(
        "-f", "lavfi", "-i", f"sine=frequency={frequency}:duration={seconds}:sample_rate=16000", str(path)
    )
    return path


def _wav_seconds(path: Path) -> float:
    with wave.open(str(path)) as wav:
        return float(wav.getnframes()) / float(wav.getframerate())


def _decoded_seconds(path: Path | str) -> float:
    return len(media.decode_audio(str(path))) / SAMPLE_RATE


def _media_error(call: Callable[..., object], path: Path | str, **kwargs: object) -> MediaError:
    """Call `call(str(path), **kwargs)` and return the MediaError it must raise."""
    with pytest.raises(MediaError) as caught:
        call(str(path), **kwargs)
    assert caught.value.path == str(path)
    assert str(path) in str(caught.value)
    return caught.value


@dataclass(frozen=True)
class Encoding:
    extension: str
    # Codec of the audio stream ffprobe must report.
    audio_codec: str
    ffmpeg_args: tuple[str, ...]
    has_video: bool = False


ENCODINGS = (
    Encoding("wav", "pcm_s16le", ()),
    Encoding("mp3", "mp3", ("-c:a", "libmp3lame")),
    Encoding("flac", "flac", ("-c:a", "flac")),
    Encoding("ogg", "vorbis", ("-c:a", "libvorbis")),
    Encoding("opus", "opus", ("-c:a", "libopus")),
    Encoding("m4a", "aac", ("-c:a", "aac")),
    Encoding("mp4", "aac", ("-c:v", "mpeg4", "-c:a", "aac"), has_video=True),
    Encoding("mkv", "vorbis", ("-c:v", "mpeg4", "-c:a", "libvorbis"), has_video=True),
    Encoding("webm", "opus", ("-c:v", "libvpx", "-c:a", "libopus"), has_video=True),
)


@dataclass(frozen=True)
class SpeechFiles:
    source: Path
    seconds: float
    folder: Path

    def encoded(self, encoding: Encoding) -> Path:
        return self.folder / f"speech.{encoding.extension}"


@pytest.fixture(scope="module")
def speech_files(tmp_path_factory: pytest.TempPathFactory) -> SpeechFiles:
    """One espeak-ng sentence, encoded once in every format under test."""
    folder = tmp_path_factory.mktemp("speech")
    source = _speak(folder / "source.wav")
    seconds = _wav_seconds(source)
    for encoding in ENCODINGS:
        target = folder / f"speech.{encoding.extension}"
        if encoding.has_video:
            # A tiny black picture exactly as long as the speech.
            video = ("-f", "lavfi", "-t", f"{seconds:.3f}", "-i", "color=c=black:s=32x32:r=25")
            _ffmpeg(*video, "-i", str(source), *encoding.ffmpeg_args, str(target))
        else:
            _ffmpeg("-i", str(source), *encoding.ffmpeg_args, str(target))
    return SpeechFiles(source=source, seconds=seconds, folder=folder)


# --- formats ------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ENCODINGS, ids=lambda e: e.extension)
def test_every_format_decodes_to_its_length_of_16khz_mono_speech(
    speech_files: SpeechFiles, encoding: Encoding
) -> None:
    audio = media.decode_audio(str(speech_files.encoded(encoding)))

    assert audio.dtype == np.float32
    assert audio.ndim == 1
    assert len(audio) / SAMPLE_RATE == pytest.approx(speech_files.seconds, abs=LENGTH_TOLERANCE_SECONDS)
    assert float(np.max(np.abs(audio))) <= 1.0
    # Speech, not silence: espeak-ng speaks at a loud, steady level.
    assert float(np.sqrt(np.mean(audio**2))) > 0.02


@pytest.mark.parametrize("encoding", ENCODINGS, ids=lambda e: e.extension)
def test_every_format_probes_with_duration_and_audio_codec(
    speech_files: SpeechFiles, encoding: Encoding
) -> None:
    info = media.probe(str(speech_files.encoded(encoding)))

    assert info.has_audio
    assert info.audio_codec == encoding.audio_codec
    assert info.duration_seconds == pytest.approx(speech_files.seconds, abs=LENGTH_TOLERANCE_SECONDS)
    assert media.check_source(str(speech_files.encoded(encoding))) == info


@pytest.mark.parametrize("extension", ["wav", "mp3", "mp4"])
def test_decoded_samples_equal_whisper_load_audio(speech_files: SpeechFiles, extension: str) -> None:
    from whisper import audio as whisper_audio  # a dependency of whisperd: never skipped

    path = str(speech_files.folder / f"speech.{extension}")

    assert np.array_equal(media.decode_audio(path), whisper_audio.load_audio(path))


def test_probe_reports_container_and_codec_names(speech_files: SpeechFiles) -> None:
    info = media.probe(str(speech_files.folder / "speech.m4a"))

    assert info == media.MediaInfo(
        duration_seconds=info.duration_seconds,
        has_audio=True,
        format_name="mov,mp4,m4a,3gp,3g2,mj2",
        audio_codec="aac",
    )


# --- hostile names ------------------------------------------------------------------------------

HOSTILE_NAMES = [
    "-y.wav",
    "concat:a.wav",
    "http:x.wav",
    "file:x.wav",
    "new\nline.wav",
    "ünï cödé.wav",
    "a b.wav",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=repr)
def test_hostile_names_decode_that_file_and_only_that_file(tmp_path: Path, name: str) -> None:
    # Decoys a misread name would pick up instead: different lengths.
    _tone(tmp_path / "a.wav", 2.0)
    _tone(tmp_path / "x.wav", 3.0)
    target = _tone(tmp_path / name, 1.0)

    assert _decoded_seconds(target) == pytest.approx(1.0, abs=0.01)
    assert media.check_source(str(target)).duration_seconds == pytest.approx(1.0, abs=0.01)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({"a.wav", "x.wav", name})


def test_concat_protocol_name_does_not_concatenate(tmp_path: Path) -> None:
    _tone(tmp_path / "a.wav", 2.0)
    _tone(tmp_path / "b.wav", 3.0)
    target = _tone(tmp_path / "concat:a.wav|b.wav", 1.0)

    assert _decoded_seconds(target) == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize("name", ["-y.wav", "concat:a.wav|b.wav", "http:x.wav"])
def test_relative_hostile_names_are_read_as_that_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    _tone(tmp_path / "a.wav", 2.0)
    _tone(tmp_path / "b.wav", 3.0)
    _tone(tmp_path / name, 1.0)
    monkeypatch.chdir(tmp_path)

    assert _decoded_seconds(name) == pytest.approx(1.0, abs=0.01)
    assert media.check_source(name).duration_seconds == pytest.approx(1.0, abs=0.01)


# --- hostile contents ---------------------------------------------------------------------------


def test_empty_file_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.mp3"
    empty.touch()

    assert _media_error(media.check_source, empty).reason == "file is empty"
    assert _media_error(media.decode_audio, empty).reason == "file is empty"


def test_text_renamed_mp3_is_not_media(tmp_path: Path) -> None:
    text = tmp_path / "notes.mp3"
    text.write_text("Meeting notes: buy milk, call the plumber, finish the report.\n" * 20)

    for call in (media.check_source, media.decode_audio, media.probe):
        assert _media_error(call, text).reason.startswith("not a media file ffmpeg can read: ")


def test_playlist_renamed_mp3_cannot_make_ffmpeg_read_another_file(tmp_path: Path) -> None:
    # An HLS playlist names other files; ffmpeg would decode /elsewhere/secret.ts.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    secret = elsewhere / "secret.ts"
    _ffmpeg(
        "-i", str(_speak(elsewhere / "secret.wav", "the safe code is four two")), "-c:a", "aac", str(secret)
    )
    playlist = tmp_path / "innocent.mp3"
    playlist.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:3,\n{secret}\n#EXT-X-ENDLIST\n")

    for call in (media.check_source, media.decode_audio, media.probe):
        error = _media_error(call, playlist)
        assert error.reason.startswith("not a media file ffmpeg can read: its format (hls)")


def test_truncated_mp3_decodes_the_part_that_is_there(speech_files: SpeechFiles, tmp_path: Path) -> None:
    whole = speech_files.folder / "speech.mp3"
    half = tmp_path / "half.mp3"
    half.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])

    assert media.check_source(str(half)).has_audio
    assert 0.3 * speech_files.seconds < _decoded_seconds(half) < 0.7 * speech_files.seconds


def test_mp3_cut_inside_its_first_frame_is_not_media(speech_files: SpeechFiles, tmp_path: Path) -> None:
    stub = tmp_path / "stub.mp3"
    stub.write_bytes((speech_files.folder / "speech.mp3").read_bytes()[:200])

    assert _media_error(media.check_source, stub).reason.startswith("not a media file ffmpeg can read: ")
    assert _media_error(media.decode_audio, stub).reason.startswith("not a media file ffmpeg can read: ")


def test_wav_with_header_and_no_samples_decodes_nothing(speech_files: SpeechFiles, tmp_path: Path) -> None:
    header_only = tmp_path / "header.wav"
    header_only.write_bytes(speech_files.source.read_bytes()[:44])

    assert _media_error(media.decode_audio, header_only).reason.startswith("no audio could be decoded")


def test_truncated_mp4_names_the_missing_index(speech_files: SpeechFiles, tmp_path: Path) -> None:
    # ffmpeg writes the mp4 index (moov) last, so the first half has none.
    whole = speech_files.folder / "speech.mp4"
    half = tmp_path / "half.mp4"
    half.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])

    for call in (media.check_source, media.decode_audio):
        reason = _media_error(call, half).reason
        assert reason.startswith("not a media file ffmpeg can read: moov atom not found")


def test_video_without_audio_is_refused(tmp_path: Path) -> None:
    silent_film = tmp_path / "film.mp4"
    _ffmpeg("-f", "lavfi", "-i", "color=c=black:s=32x32:d=1", "-c:v", "mpeg4", str(silent_film))

    reason = _media_error(media.check_source, silent_film).reason
    assert reason == "no audio stream (ffprobe found: mov,mp4,m4a,3gp,3g2,mj2)"
    assert _media_error(media.decode_audio, silent_film).reason.startswith("no audio stream")
    assert media.probe(str(silent_film)).has_audio is False


def test_zeros_named_mp3_has_no_audio_stream(tmp_path: Path) -> None:
    zeros = tmp_path / "zeros.mp3"
    with zeros.open("wb") as out:
        out.truncate(2_000_000)

    assert _media_error(media.check_source, zeros).reason == "no audio stream (ffprobe found: mp3)"


def test_huge_file_over_the_size_limit_is_refused_without_reading_it(tmp_path: Path) -> None:
    huge = tmp_path / "huge.mkv"
    with huge.open("wb") as out:
        out.truncate(3_000_000_000)  # sparse: no disk used

    reason = _media_error(media.check_source, huge, max_size_bytes=100_000_000).reason
    assert reason == "file is 3000 MB, over the inbox limit of 100 MB"


def test_small_file_under_the_size_limit_passes(speech_files: SpeechFiles) -> None:
    path = speech_files.folder / "speech.flac"

    assert media.check_source(str(path), max_size_bytes=path.stat().st_size).has_audio


def test_audio_over_the_duration_limit_is_refused(tmp_path: Path) -> None:
    long_tone = _tone(tmp_path / "long.flac", 3.5)

    reason = _media_error(media.check_source, long_tone, max_duration_seconds=2.0).reason
    assert reason == "audio is 3.5 s long, over the inbox limit of 2 s"
    assert media.check_source(str(long_tone), max_duration_seconds=4.0).duration_seconds == pytest.approx(3.5)


# --- things that are not readable files ---------------------------------------------------------


def test_folder_named_like_audio_is_not_a_regular_file(tmp_path: Path) -> None:
    folder = tmp_path / "x.wav"
    folder.mkdir()

    assert _media_error(media.check_source, folder).reason == "not a regular file"
    assert _media_error(media.decode_audio, folder).reason == "not a regular file"


@pytest.mark.timeout(60)
def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "stream.wav"
    os.mkfifo(fifo)

    assert _media_error(media.check_source, fifo).reason == "not a regular file"
    assert _media_error(media.decode_audio, fifo).reason == "not a regular file"


def test_missing_file_vanished(tmp_path: Path) -> None:
    gone = tmp_path / "gone.mp3"

    for call in (media.check_source, media.decode_audio, media.probe):
        assert _media_error(call, gone).reason == "file vanished before it could be read"


def test_unreadable_file_is_refused_with_permission_denied() -> None:
    """chmod 000 means nothing to root, so as root the checks run in a forked
    child that has become user nobody (the interpreter may live where nobody
    cannot exec it, so the child does not start a new one)."""
    with tempfile.TemporaryDirectory(prefix="whisperd-media-") as folder:
        os.chmod(folder, 0o755)
        locked = _tone(Path(folder) / "locked.wav", 0.5)
        os.chmod(locked, 0o000)
        if os.geteuid() == 0:
            reasons = _reasons_as_nobody(locked)
        else:
            reasons = [_media_error(call, locked).reason for call in (media.check_source, media.decode_audio)]

    assert reasons == ["cannot read file: permission denied"] * 2


def _reasons_as_nobody(path: Path) -> list[str]:
    """The MediaError reasons of check_source and decode_audio run by user nobody."""
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_send_reasons_as_nobody, args=(str(path), sender))
    child.start()
    sender.close()
    try:
        assert receiver.poll(60), "the child running as nobody sent nothing"
        reasons: list[str] = receiver.recv()
    finally:
        child.join(60)
    assert child.exitcode == 0
    return reasons


def _send_reasons_as_nobody(path: str, sender: Connection) -> None:
    os.setgroups([])
    os.setgid(NOBODY_UID)
    os.setuid(NOBODY_UID)
    reasons = []
    for call in (media.check_source, media.decode_audio):
        try:
            call(path)
            reasons.append("no error")
        except MediaError as error:
            reasons.append(error.reason)
    sender.send(reasons)


# --- timeouts and the ffmpeg install -------------------------------------------------------------


def _child_pids() -> set[int]:
    children: set[int] = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        children.update(int(pid) for pid in (task / "children").read_text().split())
    return children


@pytest.fixture(params=["setpriv", "preexec_fn"])
def launch(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways a tool is started with its parent-death signal: through
    util-linux's setpriv (vfork: the worker is not copied) and, where no
    setpriv can do it, a preexec_fn."""
    if request.param == "setpriv":
        assert media_tool._setpriv() is not None, "setpriv (util-linux) should be installed here"
    else:
        monkeypatch.setattr(media_tool, "_setpriv", lambda: None)
    return str(request.param)


def test_either_launch_decodes_the_same_samples(speech_files: SpeechFiles, launch: str) -> None:
    path = str(speech_files.folder / "speech.mp3")
    from whisper import audio as whisper_audio  # a dependency of whisperd: never skipped

    assert np.array_equal(media.decode_audio(path), whisper_audio.load_audio(path))


def test_decoding_past_the_timeout_stops_ffmpeg(tmp_path: Path, launch: str) -> None:
    # Ten minutes of audio take ffmpeg far longer than 20 ms to decode.
    long_tone = _tone(tmp_path / "ten-minutes.wav", 600.0)
    before = _child_pids()

    error = _media_error(media.decode_audio, long_tone, timeout=0.02)

    assert error.reason == "timed out decoding after 0.02 s"
    assert _child_pids() <= before  # ffmpeg was killed and reaped


def test_ffmpeg_available_reports_the_version() -> None:
    ok, line = media_tool.ffmpeg_available()

    assert ok
    assert line.startswith("ffmpeg version ")


def test_missing_ffmpeg_says_what_to_install(
    speech_files: SpeechFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert shutil.which("ffmpeg") is not None
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no ffmpeg, no ffprobe

    ok, message = media_tool.ffmpeg_available()
    assert not ok
    assert "ffmpeg not found on PATH" in message
    assert "apt-get install ffmpeg" in message
    reason = _media_error(media.decode_audio, speech_files.source).reason
    assert reason.startswith("ffmpeg not found on PATH")
