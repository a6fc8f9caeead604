"""Part of the job store: what daemons and operators register.

The instance registry (store/instances.py) and the inboxes each instance
watches, paused inboxes (`whisperd pause`), completion-hook subscriptions
and deliveries (store/hooks.py), and files waiting for the job at their
path to end (store/deferrals.py).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from whisperd.jobs import (
    FileIdentity,
    JobSpec,
)
from whisperd.store import hooks as store_hooks
from whisperd.store import instances as store_instances
from whisperd.store.base import StoreBase, outage_retried
from whisperd.store.database import _DbEpoch
from whisperd.store.rows import (
    _clock,
    _deferral_key,
    _deferred_from_row,
    _to_int64,
)
from whisperd.store.schema import (
    _ACTIVE_VALUES,
    DEFERRED_FILES,
    JOBS,
    PAUSED_INBOXES,
)
from whisperd.store.values import DeferredFile, HookDelivery, InstanceEntry


class RegistryMixin(StoreBase):
    """Instances, paused inboxes, hooks and waiting files."""

    @outage_retried
    def register_instance(self, entry: InstanceEntry, *, stale_after: float) -> InstanceEntry | None:
        """Register this daemon under entry.instance. Returns the live daemon
        already holding that name (heartbeat younger than stale_after, another
        state folder) instead; nothing is written then."""
        return self._write_racing_inserts(
            lambda conn: store_instances.register(conn, entry, stale_after=stale_after, db_now=_DbEpoch())
        )

    @outage_retried
    def instance_heartbeat(self, instance: str, token: str) -> bool:
        """Renew the instance's heartbeat; False if another daemon took its name over."""
        with self._writing() as conn:
            return store_instances.beat(conn, instance, token, db_now=_DbEpoch())

    @outage_retried
    def set_instance_inboxes(
        self, instance: str, inboxes: Sequence[tuple[str, str]], *, stale_after: float
    ) -> list[tuple[str, str, str]]:
        """Record the inboxes (name, path) the instance watches, less those
        another live instance watches at another path under the same name;
        returns those conflicts (inbox, other instance, its path)."""

        def write(conn: Connection) -> list[tuple[str, str, str]]:
            conflicts = store_instances.path_conflicts(
                conn, instance, inboxes, stale_after=stale_after, db_now=_DbEpoch()
            )
            clashing = {inbox for inbox, _other, _path in conflicts}
            store_instances.set_inboxes(conn, instance, [i for i in inboxes if i[0] not in clashing])
            return conflicts

        return self._write_racing_inserts(write)

    @outage_retried
    def unregister_instance(self, instance: str, token: str) -> None:
        with self._writing() as conn:
            store_instances.unregister(conn, instance, token)

    @outage_retried
    def instances(self) -> list[InstanceEntry]:
        """Every registered daemon, alive or stale (see age_seconds)."""
        with self._reading() as conn:
            return store_instances.list_instances(conn, db_now=_DbEpoch())

    @outage_retried
    def pause_inbox(self, inbox: str, *, now: float | None = None) -> bool:
        """Stop workers claiming the queued jobs of `inbox` (running ones
        finish). Kept in the store: it holds across restarts and for every
        host. True if it was not paused already."""

        def pause(conn: Connection) -> bool:
            found = conn.execute(sa.select(PAUSED_INBOXES.c.inbox).where(PAUSED_INBOXES.c.inbox == inbox))
            if found.first() is not None:
                return False
            conn.execute(PAUSED_INBOXES.insert().values(inbox=inbox, paused_at=_clock(now)))
            return True

        return self._write_racing_inserts(pause)

    @outage_retried
    def resume_inbox(self, inbox: str) -> bool:
        """Let workers claim `inbox`'s jobs again. True if it was paused."""
        with self._writing() as conn:
            return (
                int(conn.execute(PAUSED_INBOXES.delete().where(PAUSED_INBOXES.c.inbox == inbox)).rowcount) > 0
            )

    @outage_retried
    def set_hook_subscriptions(self, instance: str, hooks: Mapping[str, Sequence[str]]) -> None:
        """The hook kinds (on_done, on_failed, webhook) each inbox of
        `instance` has now: a job of it that ends from then on, on any host,
        owes a delivery to each kind some daemon has."""
        with self._writing() as conn:
            store_hooks.set_subscriptions(conn, instance, hooks)

    @outage_retried
    def abandon_unsubscribed_hooks(self, *, now: float | None = None) -> int:
        """End failed the owed deliveries whose hook no daemon has any more."""
        with self._writing() as conn:
            return store_hooks.abandon_unsubscribed(conn, JOBS, now=_clock(now))

    @outage_retried
    def claim_hook_delivery(
        self,
        hooks: Mapping[str, Sequence[str]],
        *,
        lease: float,
        moved_before: float,
        now: float | None = None,
    ) -> HookDelivery | None:
        """The pending delivery due longest among the (inbox, kinds) in
        `hooks` whose job's source has moved (or that is owed since before
        `moved_before`), taken for `lease` seconds with its try counted."""
        moment = _clock(now)
        pairs = store_hooks.due_pairs(JOBS, hooks)
        if not pairs:
            return None
        # Looked for first without the write lock: idle runners poll often.
        with self._reading() as conn:
            query = store_hooks.due_query(JOBS, pairs, now=moment, moved_before=moved_before)
            if conn.execute(query).first() is None:
                return None
        with self._writing() as conn:
            return store_hooks.claim_due(
                conn, JOBS, hooks, now=moment, lease=lease, moved_before=moved_before
            )

    @outage_retried
    def record_hook_outcome(
        self, delivery: HookDelivery, *, error: str | None, retry_at: float | None, now: float | None = None
    ) -> bool:
        """A try's result: delivered (error None), due again at retry_at, or
        failed. False if the claim no longer held (the try outlived its lease)."""
        with self._writing() as conn:
            return store_hooks.record_outcome(conn, delivery, error=error, retry_at=retry_at, now=_clock(now))

    @outage_retried
    def hook_deliveries_of(self, job_id: int) -> list[HookDelivery]:
        """Every hook delivery a job's ends owed, oldest first."""
        with self._reading() as conn:
            return store_hooks.deliveries_of(conn, job_id)

    @outage_retried
    def paused_inboxes(self) -> dict[str, float]:
        """Paused inbox name -> when it was paused (Unix time)."""
        with self._reading() as conn:
            rows = conn.execute(sa.select(PAUSED_INBOXES.c.inbox, PAUSED_INBOXES.c.paused_at)).all()
        return {str(inbox): float(at) for inbox, at in rows}

    @outage_retried
    def defer_file(
        self, spec: JobSpec, identity: FileIdentity, *, waits_for: int, now: float | None = None
    ) -> None:
        """Record that the file `identity` at spec's path waits for job
        `waits_for` (active at that path) to end; replaces what waited there."""
        row = {
            "inbox": spec.inbox,
            "rel_path": spec.rel_path,
            "spec_json": json.dumps(spec.to_dict(), sort_keys=True),
            "file_device": _to_int64(identity.device),
            "file_inode": _to_int64(identity.inode),
            "file_size": identity.size,
            "file_mtime_ns": identity.mtime_ns,
            "waits_for": waits_for,
            "recorded_at": _clock(now),
        }

        def write(conn: Connection) -> None:
            conn.execute(DEFERRED_FILES.delete().where(*_deferral_key(spec)))
            conn.execute(DEFERRED_FILES.insert().values(**row))

        self._write_racing_inserts(write)

    @outage_retried
    def deferred_files(self, inboxes: Sequence[str], *, ready_only: bool = True) -> list[DeferredFile]:
        """The files waiting in `inboxes`, oldest first; with ready_only, only
        those whose job has ended (or is gone)."""
        query = sa.select(DEFERRED_FILES).where(DEFERRED_FILES.c.inbox.in_(list(inboxes)))
        if ready_only:
            active = sa.select(JOBS.c.id).where(JOBS.c.state.in_(_ACTIVE_VALUES))
            query = query.where(DEFERRED_FILES.c.waits_for.not_in(active.scalar_subquery()))
        with self._reading() as conn:
            rows = conn.execute(query.order_by(DEFERRED_FILES.c.recorded_at)).all()
        return [_deferred_from_row(row) for row in rows]

    @outage_retried
    def forget_deferred(self, item: DeferredFile) -> bool:
        """Drop a waiting file's row (gone, or replaced again) if it still
        records that file. True if a row was dropped."""
        with self._writing() as conn:
            deleted = conn.execute(DEFERRED_FILES.delete().where(*_deferral_key(item.spec, item.identity)))
            return int(deleted.rowcount) > 0
