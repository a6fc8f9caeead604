"""Watching inboxes: watchdog observers and periodic rescans turned into
settled files and cancel-folder arrivals.

`watcher.Watcher` owns the settle thread and the observers (`observers`);
`rules` says which names are media, temporary or unsupported and where a
path lies; `delivery` hands settled runs to intake. Touches no store.
May import: config, jobs, errors, logs.
"""
