"""Workers: the pool of worker processes and the worker itself.

`pool.WorkerPool` owns one process per device slot (`slots`), talks to each
through a `channel.SlotChannel`, watches its `liveness` and replaces it;
`worker` is the process: claim -> decode -> transcribe -> end, with its
`model_cache` of loaded engines' models, a `job_session` per running job and
`source_change` for a file rewritten under its job. The only package that
runs an engine. May import everything below it: lifecycle, store, engines,
media, files, metrics (views), devices, config, jobs.
"""
