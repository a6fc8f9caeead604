"""Part of the job store: completion-hook deliveries.

A job that ends done or failed owes one delivery per hook its inbox has
(`on_done` or `on_failed`, and `webhook_url`). The delivery rows are written
in the same transaction that ends the job (base.StoreBase._fenced_end
calls record_job_end), so a daemon killed right after a job ended still owes,
and after its restart makes, every delivery: at least once.

Which hooks an inbox has is a fact of the config; the store keeps a copy in
`hook_subscriptions` (set by each daemon at start and reload) because the
transaction that ends a job runs in a worker process that has no config.

A delivery is claimed by a hook runner for a lease (compare-and-set on
next_attempt_at); a runner killed mid-delivery leaves the lease to run out,
and the delivery is made again. JobStore calls these functions
inside its own transactions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from whisperd.store.values import HookDelivery

# The kinds of delivery, and the job states that owe each.
HOOK_KINDS = ("on_done", "on_failed", "webhook")
KINDS_FOR_STATE: Mapping[str, tuple[str, ...]] = {
    "done": ("on_done", "webhook"),
    "failed": ("on_failed", "webhook"),
}
PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
NO_LONGER_CONFIGURED = "no daemon has this hook any more (removed from its inbox, or the inbox removed)"


def define_hook_tables(metadata: sa.MetaData) -> tuple[sa.Table, sa.Table]:
    """The delivery record (one row per hook per job end) and the hooks each inbox has."""
    deliveries = sa.Table(
        "hook_deliveries",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.Integer, nullable=False),
        # on_done, on_failed or webhook.
        sa.Column("kind", sa.String(16), nullable=False),
        # pending (owed), delivered, failed (given up after hook_attempts).
        sa.Column("state", sa.String(16), nullable=False),
        # Tries so far; a try counts from its claim (one cut short by a kill counts).
        sa.Column("attempts", sa.Integer, nullable=False),
        # A pending delivery is due from then (a claim pushes it past its lease).
        sa.Column("next_attempt_at", sa.Float, nullable=False),
        sa.Column("last_error", sa.Text),
        sa.Column("delivered_at", sa.Float),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    sa.Index("ix_hook_deliveries_due", deliveries.c.state, deliveries.c.next_attempt_at)
    sa.Index("ix_hook_deliveries_job", deliveries.c.job_id)
    # Each daemon's own rows: a shared inbox may have a hook on one host only,
    # and a job of it owes that hook whichever host ends it.
    subscriptions = sa.Table(
        "hook_subscriptions",
        metadata,
        sa.Column("instance", sa.Text, primary_key=True),
        sa.Column("inbox", sa.Text, primary_key=True),
        sa.Column("kind", sa.String(16), primary_key=True),
    )
    return deliveries, subscriptions


HOOK_DELIVERIES, HOOK_SUBSCRIPTIONS = define_hook_tables(sa.MetaData())


def _delivery(row: Any) -> HookDelivery:
    m = row._mapping
    return HookDelivery(
        id=int(m["id"]),
        job_id=int(m["job_id"]),
        kind=str(m["kind"]),
        state=str(m["state"]),
        attempts=int(m["attempts"]),
        next_attempt_at=float(m["next_attempt_at"]),
        last_error=m["last_error"],
        delivered_at=m["delivered_at"],
    )


def record_job_end(conn: Connection, jobs: sa.Table, job_id: int, state: str, now: float) -> None:
    """The job just ended in `state`: owe a delivery to each hook its inbox has for that state."""
    kinds = KINDS_FOR_STATE.get(state)
    if not kinds:
        return
    inbox = sa.select(jobs.c.inbox).where(jobs.c.id == job_id).scalar_subquery()
    # One delivery per kind, however many daemons have that hook on the inbox.
    owed = (
        sa.select(
            sa.literal(job_id).label("job_id"),
            HOOK_SUBSCRIPTIONS.c.kind,
            sa.literal(PENDING).label("state"),
            sa.literal(0).label("attempts"),
            sa.literal(now).label("next_attempt_at"),
            sa.literal(now).label("created_at"),
        )
        .where(HOOK_SUBSCRIPTIONS.c.inbox == inbox, HOOK_SUBSCRIPTIONS.c.kind.in_(kinds))
        .group_by(HOOK_SUBSCRIPTIONS.c.kind)
    )
    columns = ["job_id", "kind", "state", "attempts", "next_attempt_at", "created_at"]
    conn.execute(HOOK_DELIVERIES.insert().from_select(columns, owed))


def set_subscriptions(conn: Connection, instance: str, hooks: Mapping[str, Sequence[str]]) -> None:
    """`instance`'s hooks are now exactly `hooks` (inbox -> kinds): its
    earlier rows go (an inbox or hook a reload removed), other daemons' stay."""
    conn.execute(HOOK_SUBSCRIPTIONS.delete().where(HOOK_SUBSCRIPTIONS.c.instance == instance))
    rows = [
        {"instance": instance, "inbox": inbox, "kind": kind}
        for inbox, kinds in hooks.items()
        for kind in kinds
    ]
    if rows:
        conn.execute(HOOK_SUBSCRIPTIONS.insert(), rows)


def abandon_unsubscribed(conn: Connection, jobs: sa.Table, *, now: float) -> int:
    """Owed deliveries no daemon has the hook for any more (removed from
    every config, or its inbox removed) end failed, saying so, instead of
    staying owed forever. Returns how many."""
    subscribed = (
        sa.exists()
        .where(
            jobs.c.id == HOOK_DELIVERIES.c.job_id,
            HOOK_SUBSCRIPTIONS.c.inbox == jobs.c.inbox,
            HOOK_SUBSCRIPTIONS.c.kind == HOOK_DELIVERIES.c.kind,
        )
        .correlate(HOOK_DELIVERIES)
    )
    result = conn.execute(
        HOOK_DELIVERIES.update()
        .where(HOOK_DELIVERIES.c.state == PENDING, HOOK_DELIVERIES.c.next_attempt_at <= now, ~subscribed)
        .values(state=FAILED, last_error=NO_LONGER_CONFIGURED)
    )
    return int(result.rowcount or 0)


def forsake_owed(conn: Connection, job_id: int, reason: str) -> None:
    """A job queued again (`whisperd retry`): what its earlier end still owed
    would describe a job that is running again, so it ends failed with `reason`."""
    conn.execute(
        HOOK_DELIVERIES.update()
        .where(HOOK_DELIVERIES.c.job_id == job_id, HOOK_DELIVERIES.c.state == PENDING)
        .values(state=FAILED, last_error=reason)
    )


def due_pairs(jobs: sa.Table, hooks: Mapping[str, Sequence[str]]) -> list[sa.ColumnElement[bool]]:
    return [
        sa.and_(jobs.c.inbox == inbox, HOOK_DELIVERIES.c.kind == kind)
        for inbox, kinds in hooks.items()
        for kind in kinds
    ]


def due_query(
    jobs: sa.Table, pairs: Sequence[sa.ColumnElement[bool]], *, now: float, moved_before: float
) -> sa.Select[Any]:
    """The delivery due longest among (inbox, kind) `pairs` (see claim_due)."""
    return (
        sa.select(HOOK_DELIVERIES)
        .join(jobs, jobs.c.id == HOOK_DELIVERIES.c.job_id)
        .where(
            HOOK_DELIVERIES.c.state == PENDING,
            HOOK_DELIVERIES.c.next_attempt_at <= now,
            sa.or_(*pairs),
            sa.or_(jobs.c.disposed_at.is_not(None), HOOK_DELIVERIES.c.created_at <= moved_before),
        )
        .order_by(HOOK_DELIVERIES.c.next_attempt_at, HOOK_DELIVERIES.c.id)
        .limit(1)
    )


def claim_due(
    conn: Connection,
    jobs: sa.Table,
    hooks: Mapping[str, Sequence[str]],
    *,
    now: float,
    lease: float,
    moved_before: float,
) -> HookDelivery | None:
    """Take the delivery due longest of the (inbox, kind) pairs in `hooks`
    for `lease` seconds, its attempt counted; None when nothing is due. A
    delivery waits for its job's source move, unless owed since before
    `moved_before` (a move that is stuck)."""
    pairs = due_pairs(jobs, hooks)
    if not pairs:
        return None
    row = conn.execute(
        due_query(jobs, pairs, now=now, moved_before=moved_before).with_for_update(
            skip_locked=True, of=HOOK_DELIVERIES
        )
    ).first()
    if row is None:
        return None
    found = _delivery(row)
    taken = conn.execute(
        HOOK_DELIVERIES.update()
        .where(
            HOOK_DELIVERIES.c.id == found.id,
            HOOK_DELIVERIES.c.state == PENDING,
            HOOK_DELIVERIES.c.next_attempt_at == found.next_attempt_at,
        )
        .values(attempts=found.attempts + 1, next_attempt_at=now + lease)
    )
    if taken.rowcount != 1:
        return None  # another runner took it first
    return dataclasses.replace(found, attempts=found.attempts + 1, next_attempt_at=now + lease)


def record_outcome(
    conn: Connection,
    delivery: HookDelivery,
    *,
    error: str | None,
    retry_at: float | None,
    now: float,
) -> bool:
    """After a try: delivered (no error), pending again until retry_at, or
    failed (no retry_at). Fenced on the claim: a try that outlived its lease
    (another runner took the delivery since) changes nothing; False then."""
    if error is None:
        values: dict[str, Any] = {"state": DELIVERED, "delivered_at": now, "last_error": None}
    elif retry_at is not None:
        values = {"state": PENDING, "next_attempt_at": retry_at, "last_error": error}
    else:
        values = {"state": FAILED, "last_error": error}
    result = conn.execute(
        HOOK_DELIVERIES.update()
        .where(
            HOOK_DELIVERIES.c.id == delivery.id,
            HOOK_DELIVERIES.c.state == PENDING,
            HOOK_DELIVERIES.c.attempts == delivery.attempts,
            HOOK_DELIVERIES.c.next_attempt_at == delivery.next_attempt_at,
        )
        .values(**values)
    )
    return int(result.rowcount or 0) == 1


def deliveries_of(conn: Connection, job_id: int) -> list[HookDelivery]:
    rows = conn.execute(
        sa.select(HOOK_DELIVERIES).where(HOOK_DELIVERIES.c.job_id == job_id).order_by(HOOK_DELIVERIES.c.id)
    ).all()
    return [_delivery(row) for row in rows]
