"""The job store: the single truth about every job, in SQLite or PostgreSQL.

`job_store.JobStore` is the one class callers use; its verbs are split by
concern (enqueue, attempts, reads, moves, upkeep, registry) over `base`
(open, transactions, the fenced update, `@outage_retried`), `database`
(URL, engine, the database's clock, migrations) and `schema` (the tables).
`notify` holds PostgreSQL's wake-ups and the listener thread; `values` the
plain values verbs return; `report` the `--json` documents of status, jobs
and show. May import: config, jobs, errors, events, logs. Never torch.
"""
