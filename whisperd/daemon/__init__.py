"""The daemon: `whisperd run`, the composition root.

`root.Daemon` builds every part from the config, starts them in order,
stops them in reverse, and runs the main loop; beside it: `instance` (the
state lock and the registry row), `housekeeping` (the loop's periodic pass),
`disposal` (owed source moves), `pool_requests`, `views` (what metrics read),
`notify` and `sdnotify` (systemd), `parts`, `signals`, `reloading`.
May import every package but cli.
"""
