"""Completion hooks: a program or a webhook told when a job ends.

`runner.HookRunner` owns the hook threads, which take owed deliveries from
the store; `delivery` makes one try (a program in its own process group, or
an HTTP POST). May import: store, config, jobs, logs.
"""
