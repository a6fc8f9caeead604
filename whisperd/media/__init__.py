"""Media: ffmpeg and ffprobe on a source file.

`decode` probes and decodes a source to 16 kHz mono float32 (`SAMPLE_RATE`)
with the checks and reasons users read; `tool` runs ffmpeg/ffprobe as
bounded children that die with their worker. May import: files, errors.
"""
