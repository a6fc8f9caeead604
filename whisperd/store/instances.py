"""Part of the job store: the registry of the daemons sharing it.

Every daemon on a store is an instance with a name unique among the live
ones (`[daemon] instance`, by default the hostname). Its row says who it is
(pid, version, slots, devices) and when it last proved it was alive, on the
database's clock; a second daemon taking a name whose row is fresh is
refused. Its inbox rows say which inboxes it watches: workers claim only
jobs of those, so no host takes a file it cannot see.

A row is taken over when it is stale (no heartbeat for the lease) or when it
carries the same state-folder token: the state folder is locked by one live
daemon at a time, so the same token means the previous holder is dead (a
restart after a crash). JobStore calls these functions inside its
own transactions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from whisperd.store.values import InstanceEntry


def define_instance_tables(metadata: sa.MetaData) -> tuple[sa.Table, sa.Table]:
    """The registry (schema v5): one row per instance, one per watched inbox."""
    instances = sa.Table(
        "instances",
        metadata,
        sa.Column("instance", sa.Text, primary_key=True),
        # Random id kept in the instance's state folder (see the module doc).
        sa.Column("token", sa.String(36), nullable=False),
        sa.Column("host", sa.Text, nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("version", sa.Text, nullable=False),
        sa.Column("slots", sa.Integer, nullable=False),
        sa.Column("devices", sa.Text, nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
        # Database clock (Unix seconds) of the last heartbeat.
        sa.Column("heartbeat_at", sa.Float, nullable=False),
    )
    instance_inboxes = sa.Table(
        "instance_inboxes",
        metadata,
        sa.Column("instance", sa.Text, primary_key=True),
        sa.Column("inbox", sa.Text, primary_key=True),
        # The inbox's folder on that host: a shared inbox has the same one everywhere.
        sa.Column("path", sa.Text, nullable=False),
    )
    return instances, instance_inboxes


INSTANCES, INSTANCE_INBOXES = define_instance_tables(sa.MetaData())

# Column added by schema v12: the lease the instance runs with. Hosts may
# run with different leases, so a heartbeat's age is judged by its owner's
# lease, not by the reader's (NULL: a row written before v12).
_V12_LEASE_COLUMN = ("lease_seconds", sa.Float())
INSTANCES.append_column(sa.Column(*_V12_LEASE_COLUMN))


def add_lease_column(conn: Connection) -> None:
    """Schema v12: add instances.lease_seconds."""
    name, type_ = _V12_LEASE_COLUMN
    conn.exec_driver_sql(f"ALTER TABLE instances ADD COLUMN {name} {type_.compile(dialect=conn.dialect)}")


def _entry(row: Any, now: float) -> InstanceEntry:
    m = row._mapping
    return InstanceEntry(
        instance=str(m["instance"]),
        token=str(m["token"]),
        host=str(m["host"]),
        pid=int(m["pid"]),
        version=str(m["version"]),
        slots=int(m["slots"]),
        devices=str(m["devices"]),
        started_at=float(m["started_at"]),
        age_seconds=max(0.0, now - float(m["heartbeat_at"])),
        lease_seconds=None if m["lease_seconds"] is None else float(m["lease_seconds"]),
    )


def register(
    conn: Connection, entry: InstanceEntry, *, stale_after: float, db_now: Any
) -> InstanceEntry | None:
    """Write `entry` as the live holder of its name. Returns the other live
    daemon holding the name instead (nothing is written then)."""
    row = conn.execute(
        sa.select(INSTANCES, db_now.label("now"))
        .where(INSTANCES.c.instance == entry.instance)
        .with_for_update()
    ).first()
    values = {
        "token": entry.token,
        "host": entry.host,
        "pid": entry.pid,
        "version": entry.version,
        "slots": entry.slots,
        "devices": entry.devices,
        "started_at": entry.started_at,
        "heartbeat_at": db_now,
        "lease_seconds": entry.lease_seconds,
    }
    if row is None:
        conn.execute(INSTANCES.insert().values(instance=entry.instance, **values))
        return None
    holder = _entry(row, float(row._mapping["now"]))
    if holder.token != entry.token and holder.is_live(stale_after):
        return holder
    conn.execute(INSTANCES.update().where(INSTANCES.c.instance == entry.instance).values(**values))
    conn.execute(INSTANCE_INBOXES.delete().where(INSTANCE_INBOXES.c.instance == entry.instance))
    return None


def beat(conn: Connection, instance: str, token: str, *, db_now: Any) -> bool:
    """Renew the instance's heartbeat; False if its row is no longer ours
    (another daemon took the name over while this one was silent)."""
    result = conn.execute(
        INSTANCES.update()
        .where(INSTANCES.c.instance == instance, INSTANCES.c.token == token)
        .values(heartbeat_at=db_now)
    )
    return result.rowcount == 1


def unregister(conn: Connection, instance: str, token: str) -> None:
    """Remove the instance's rows, if they are still ours."""
    removed = conn.execute(
        INSTANCES.delete().where(INSTANCES.c.instance == instance, INSTANCES.c.token == token)
    )
    if removed.rowcount == 1:
        conn.execute(INSTANCE_INBOXES.delete().where(INSTANCE_INBOXES.c.instance == instance))


def path_conflicts(
    conn: Connection, instance: str, inboxes: Sequence[tuple[str, str]], *, stale_after: float, db_now: Any
) -> list[tuple[str, str, str]]:
    """(inbox, other instance, its path) for each of `inboxes` (name, path)
    that another live instance watches under the same name at another path:
    one name would then stand for two folders, and jobs would go to hosts
    that cannot see their files."""
    if not inboxes:
        return []
    paths = dict(inboxes)
    query = (
        sa.select(INSTANCE_INBOXES.c.inbox, INSTANCE_INBOXES.c.instance, INSTANCE_INBOXES.c.path)
        .join(INSTANCES, INSTANCES.c.instance == INSTANCE_INBOXES.c.instance)
        .where(
            INSTANCE_INBOXES.c.instance != instance,
            INSTANCE_INBOXES.c.inbox.in_(list(paths)),
            _live(stale_after, db_now),
        )
        .order_by(INSTANCE_INBOXES.c.inbox, INSTANCE_INBOXES.c.instance)
    )
    return [
        (str(inbox), str(other), str(path))
        for inbox, other, path in conn.execute(query).all()
        if path != paths[inbox]
    ]


def _live(default_lease: float, db_now: Any) -> sa.ColumnElement[bool]:
    """SQL for InstanceEntry.is_live: the heartbeat younger than the row's
    own lease (or `default_lease` where the row has none)."""
    lease = sa.func.coalesce(INSTANCES.c.lease_seconds, default_lease)
    live: sa.ColumnElement[bool] = INSTANCES.c.heartbeat_at > db_now - lease
    return live


def set_inboxes(conn: Connection, instance: str, inboxes: Sequence[tuple[str, str]]) -> None:
    """The inboxes (name, path) the instance watches, replacing those before."""
    conn.execute(INSTANCE_INBOXES.delete().where(INSTANCE_INBOXES.c.instance == instance))
    if inboxes:
        conn.execute(
            INSTANCE_INBOXES.insert(),
            [{"instance": instance, "inbox": name, "path": path} for name, path in inboxes],
        )


def watched_by(instance: str) -> sa.Select[Any]:
    """The inbox names the instance watches (a subquery for the claim)."""
    return sa.select(INSTANCE_INBOXES.c.inbox).where(INSTANCE_INBOXES.c.instance == instance)


def list_instances(conn: Connection, *, db_now: Any) -> list[InstanceEntry]:
    """Every registered instance, by name, with the age of its heartbeat and
    the inboxes it watches (by name)."""
    rows = conn.execute(sa.select(INSTANCES, db_now.label("now")).order_by(INSTANCES.c.instance)).all()
    watched: dict[str, list[str]] = {}
    query = sa.select(INSTANCE_INBOXES.c.instance, INSTANCE_INBOXES.c.inbox).order_by(
        INSTANCE_INBOXES.c.instance, INSTANCE_INBOXES.c.inbox
    )
    for instance, inbox in conn.execute(query).all():
        watched.setdefault(str(instance), []).append(str(inbox))
    return [
        dataclasses.replace(entry, inboxes=tuple(watched.get(entry.instance, ())))
        for entry in (_entry(row, float(row._mapping["now"])) for row in rows)
    ]
