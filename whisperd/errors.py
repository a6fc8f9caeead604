"""Errors whisperd raises on purpose. Stdlib only.

Every error that reaches a user names the file it is about and the reason.
"""

from __future__ import annotations


class WhisperdError(Exception):
    """Base class for errors whisperd raises deliberately."""


class ConfigError(WhisperdError):
    """A config file is missing, unreadable, or holds a bad key or value."""

    def __init__(self, file: str, key: str, reason: str) -> None:
        self.file = file
        self.key = key
        self.reason = reason
        where = f"{file}: {key}" if key else file
        super().__init__(f"{where}: {reason}")


class MediaError(WhisperdError):
    """A source file cannot be used: not media, empty, truncated, too long..."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class ModelNotFoundError(WhisperdError):
    """A model is neither in the models folder nor downloadable."""

    def __init__(self, name: str, folder: str, engine: str = "openai-whisper") -> None:
        self.name = name
        self.folder = folder
        if engine == "faster-whisper":
            # faster-whisper loads CTranslate2 folders only; a .pt cannot serve it.
            super().__init__(
                f"model {name!r} has no CTranslate2 folder {name}.ct2 in {folder} "
                "(faster-whisper needs model.bin, config.json and tokenizer.json); "
                f"import one with: whisperd models import CT2_FOLDER --name {name}"
            )
            return
        super().__init__(
            f"model {name!r} is not in {folder} and cannot be downloaded here; "
            f"import it with: whisperd models import PATH --name {name} "
            "(PATH: an openai-whisper .pt checkpoint or a CTranslate2 Whisper folder)"
        )


class ModelImportError(WhisperdError):
    """A file given to `whisperd models import` is not a usable Whisper model."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class JobCancelled(WhisperdError):
    """Raised inside a worker when its running job was cancelled."""


class LeaseLost(WhisperdError):
    """A worker's claim on a job was taken away (lease expired, handed on)."""


class OutputError(WhisperdError):
    """An output could not be written (disk full, permissions...)."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class NoRoomOnDevice(WhisperdError):
    """A model does not fit in a device's free memory, even after unloading
    the models that device's worker held; the job waits or goes elsewhere."""


class StoreUnavailable(WhisperdError):
    """The job store cannot be reached now (locked past the busy timeout, server
    down, connection refused) and the caller asked not to wait."""

    def __init__(self, where: str, reason: str, doing: str = "") -> None:
        self.where = where
        self.reason = reason
        super().__init__(f"{where}: {doing}store unreachable: {reason}")
