"""Part of the job store: how many jobs are in each state, without counting them.

`whisperd status` and every daemon's `whisperd_jobs{state}` gauge ask for
the number of jobs in each state. Counted with GROUP BY, that is a scan of
the whole table: 0.14-0.46 s at a million jobs on PostgreSQL (a parallel
sequential scan), once per status and per scrape on every host.

Instead the database keeps the numbers itself (schema v13). Triggers on
`jobs` append one row to `job_state_deltas` per change of a job's state
(+1 for the new state, -1 for the old; an insert or delete only one of
them), so no code path that moves a job can forget to count it, and no two
transactions ever update one shared row (a counter row would serialise
every claim on PostgreSQL and could deadlock a claim against a retry). A
read is the folded totals in `job_state_counts` plus the deltas not yet
folded; `fold` moves the deltas into the totals (the daemon's housekeeping
calls it), atomically, so a read never counts a delta twice or misses one.
"""

from __future__ import annotations

from collections.abc import Mapping

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from whisperd.jobs import JobState


def define_count_tables(metadata: sa.MetaData) -> tuple[sa.Table, sa.Table]:
    """The folded totals (one row per state) and the deltas not yet folded."""
    totals = sa.Table(
        "job_state_counts",
        metadata,
        sa.Column("state", sa.String(16), primary_key=True),
        sa.Column("jobs", sa.BigInteger, nullable=False),
    )
    deltas = sa.Table(
        "job_state_deltas",
        metadata,
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True
        ),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("delta", sa.Integer, nullable=False),
    )
    return totals, deltas


TOTALS, DELTAS = define_count_tables(sa.MetaData())

_SQLITE_TRIGGERS = (
    """CREATE TRIGGER jobs_count_insert AFTER INSERT ON jobs BEGIN
        INSERT INTO job_state_deltas (state, delta) VALUES (NEW.state, 1);
    END""",
    """CREATE TRIGGER jobs_count_delete AFTER DELETE ON jobs BEGIN
        INSERT INTO job_state_deltas (state, delta) VALUES (OLD.state, -1);
    END""",
    """CREATE TRIGGER jobs_count_update AFTER UPDATE OF state ON jobs
    WHEN OLD.state <> NEW.state BEGIN
        INSERT INTO job_state_deltas (state, delta) VALUES (OLD.state, -1), (NEW.state, 1);
    END""",
)

_POSTGRESQL_TRIGGERS = (
    """CREATE FUNCTION whisperd_count_job_state() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP <> 'INSERT' THEN
            INSERT INTO job_state_deltas (state, delta) VALUES (OLD.state, -1);
        END IF;
        IF TG_OP <> 'DELETE' THEN
            INSERT INTO job_state_deltas (state, delta) VALUES (NEW.state, 1);
        END IF;
        RETURN NULL;
    END $$""",
    """CREATE TRIGGER jobs_count_insert_delete AFTER INSERT OR DELETE ON jobs
    FOR EACH ROW EXECUTE FUNCTION whisperd_count_job_state()""",
    """CREATE TRIGGER jobs_count_update AFTER UPDATE OF state ON jobs
    FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state) EXECUTE FUNCTION whisperd_count_job_state()""",
)


def add_state_counts(conn: Connection) -> None:
    """Schema v13: the count tables, seeded from the jobs there are, and the
    triggers that keep them (in the migration's transaction, under its lock)."""
    metadata = sa.MetaData()
    define_count_tables(metadata)
    metadata.create_all(conn, checkfirst=False)
    rows = conn.exec_driver_sql("SELECT state, count(*) FROM jobs GROUP BY state").all()
    found: dict[str, int] = {str(state): int(n) for state, n in rows}
    # A row for every state from the start: folds then only ever update.
    states = sorted({*(s.value for s in JobState), *found})
    conn.execute(TOTALS.insert(), [{"state": s, "jobs": found.get(s, 0)} for s in states])
    triggers = _POSTGRESQL_TRIGGERS if conn.dialect.name == "postgresql" else _SQLITE_TRIGGERS
    for statement in triggers:
        conn.exec_driver_sql(statement)


def read(conn: Connection) -> Mapping[str, int]:
    """Jobs per state (states with none may be missing or 0), in one
    statement: a fold running meanwhile is seen wholly or not at all."""
    both = sa.union_all(
        sa.select(TOTALS.c.state, TOTALS.c.jobs.label("n")),
        sa.select(DELTAS.c.state, DELTAS.c.delta.label("n")),
    ).subquery()
    query = sa.select(both.c.state, sa.func.sum(both.c.n)).group_by(both.c.state)
    return {str(state): int(total or 0) for state, total in conn.execute(query).all()}


def fold(conn: Connection) -> int:
    """Move the deltas into the totals; returns how many deltas were folded.
    Safe beside another host folding at once: each delta row is deleted, and
    so added, by one of them only."""
    if conn.dialect.name == "postgresql":
        return _fold_postgresql(conn)
    # SQLite: the caller's write transaction holds the only write lock.
    last = conn.execute(sa.select(sa.func.max(DELTAS.c.id))).scalar()
    if last is None:
        return 0
    sums = conn.execute(
        sa.select(DELTAS.c.state, sa.func.sum(DELTAS.c.delta))
        .where(DELTAS.c.id <= last)
        .group_by(DELTAS.c.state)
    ).all()
    _add_to_totals(conn, {str(state): int(n) for state, n in sums})
    return int(conn.execute(DELTAS.delete().where(DELTAS.c.id <= last)).rowcount or 0)


def _fold_postgresql(conn: Connection) -> int:
    # The DELETE returns only rows it removed itself: a fold that waited on
    # another's row locks finds them gone and adds nothing for them.
    moved = conn.execute(DELETE_RETURNING).all()
    sums: dict[str, int] = {}
    for state, delta in moved:
        sums[str(state)] = sums.get(str(state), 0) + int(delta)
    _add_to_totals(conn, sums)
    return len(moved)


DELETE_RETURNING = DELTAS.delete().returning(DELTAS.c.state, DELTAS.c.delta)


def _add_to_totals(conn: Connection, sums: Mapping[str, int]) -> None:
    for state, n in sums.items():
        if n == 0:
            continue
        updated = conn.execute(
            TOTALS.update().where(TOTALS.c.state == state).values(jobs=TOTALS.c.jobs + n)
        ).rowcount
        if not updated:
            conn.execute(TOTALS.insert().values(state=state, jobs=n))
