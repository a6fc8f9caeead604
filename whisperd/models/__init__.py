"""Model files: where a model lives, importing one, reading CTranslate2 folders.

`locate` is the one rule of where a model is (engines, doctor and
`models list` share it; stdlib only); `checkpoints` is `whisperd models
import` (torch only inside the calls that write a checkpoint); `convert`
reads a CTranslate2 Whisper folder as openai-whisper weights (numpy).
May import: files, config, errors.
"""
