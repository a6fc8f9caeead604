"""whisperd: a transcription daemon for openai-whisper."""

__version__ = "0.1.0"
