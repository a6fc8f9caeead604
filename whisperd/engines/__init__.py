"""Engines: the Whisper implementations a worker runs, behind one interface.

`engine.Engine` (load, release, transcribe with a `JobControl`) is
implemented by `openai.OpenAIWhisper` (torch) and `faster.FasterWhisper`
(CTranslate2); `vad` finds speech with Silero; `compute_types` asks a child
process which CTranslate2 types a device runs. Imported by workers (and
compute_types by the daemon); nothing below workers imports this package.
May import: media, models, devices, config, jobs, errors.
"""
