"""Intake: settled files and cancel-folder files become jobs and cancels.

`intake.Intake` owns the intake thread, the only thread that writes to the
store about arriving files; `cancel_match` decides which job a cancel-folder
file cancels; `renames` handles a queued file renamed in its inbox.
May import: store, watch, files, lifecycle's lower layers, config, jobs.
"""
