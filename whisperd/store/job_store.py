"""The job store: the single source of truth about every job (layer L2).

One SQLAlchemy Core implementation serves SQLite (one host, several processes)
and PostgreSQL (several hosts). Every state change is a short transaction that
checks the state it expects (compare-and-set), so a job is claimed by one
worker at a time and every write by a worker is fenced by its claim token.

This module assembles JobStore from its parts and names everything the rest
of whisperd imports from the store, so no caller needs to know the parts:

| part | its one job |
| --- | --- |
| store/schema.py | the tables and MIGRATIONS (their history) |
| store/database.py | URL, engine, SQLite pragmas, the database clock, applying migrations |
| store/rows.py | rows <-> Job, identity columns, the rule of the next state |
| store/base.py | open/close, transactions, outage retries, the fenced update |
| store/enqueue.py | files becoming jobs |
| store/attempts.py | claim, the worker's fenced writes, end_attempt, lease expiry, cancel, retry |
| store/reads.py | read-only queries about jobs |
| store/moves.py | owed, failed and stuck source moves |
| store/upkeep.py | retention, vacuum, realtime factor, model memory |
| store/registry.py | instances, paused inboxes, hooks, waiting files |

JobStore implements every role of `store/values.py` (checked below by mypy).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from whisperd.store.attempts import CLAIM_CANDIDATES, AttemptsMixin
from whisperd.store.base import INSERT_RACE_RETRIES
from whisperd.store.database import PG_MIGRATION_LOCK_KEY, SQLITE_BUSY_TIMEOUT_MS
from whisperd.store.enqueue import EnqueueMixin
from whisperd.store.moves import MovesMixin
from whisperd.store.notify import StoreListener, StoreNotice
from whisperd.store.outage import RetryPolicy, StoreHealth
from whisperd.store.reads import ReadsMixin
from whisperd.store.registry import RegistryMixin
from whisperd.store.rows import _new_row
from whisperd.store.schema import (
    DEFERRED_FILES,
    JOB_ATTEMPTS,
    JOB_OUTPUTS,
    JOBS,
    MIGRATIONS,
    MODEL_MEMORY,
    PAUSED_INBOXES,
    SCHEMA_TABLE,
    SCHEMA_VERSION,
    SOURCE_MOVES,
    Migration,
)
from whisperd.store.upkeep import UpkeepMixin
from whisperd.store.values import (
    Attempt,
    DeferredFile,
    HeartbeatReply,
    HookDelivery,
    HookStore,
    InstanceEntry,
    IntakeStore,
    LifecycleStore,
    OperatorStore,
    ReaderStore,
    SupervisorStore,
    WorkerStore,
)

__all__ = [
    "CLAIM_CANDIDATES",
    "DEFERRED_FILES",
    "INSERT_RACE_RETRIES",
    "JOBS",
    "JOB_ATTEMPTS",
    "JOB_OUTPUTS",
    "MIGRATIONS",
    "MODEL_MEMORY",
    "PAUSED_INBOXES",
    "PG_MIGRATION_LOCK_KEY",
    "SCHEMA_TABLE",
    "SCHEMA_VERSION",
    "SOURCE_MOVES",
    "SQLITE_BUSY_TIMEOUT_MS",
    "Attempt",
    "DeferredFile",
    "HeartbeatReply",
    "HookDelivery",
    "InstanceEntry",
    "JobStore",
    "Migration",
    "RetryPolicy",
    "StoreHealth",
    "StoreListener",
    "StoreNotice",
    "_new_row",
]

_T = TypeVar("_T")


class JobStore(EnqueueMixin, AttemptsMixin, ReadsMixin, MovesMixin, UpkeepMixin, RegistryMixin):
    """Jobs in a database. Thread-safe; any number of processes and hosts may
    open the same database. Build with JobStore.open(url); close() when done."""


def _retried(method: Callable[..., _T]) -> Callable[..., _T]:
    @functools.wraps(method)
    def call(self: JobStore, *args: Any, **kwargs: Any) -> _T:
        return self._with_retry(lambda: method(self, *args, **kwargs))

    return call


def _own_members(cls: type) -> dict[str, Any]:
    """Every attribute `cls` has from its own body or its bases', as the MRO
    resolves it (the first class that defines a name wins)."""
    members: dict[str, Any] = {}
    for klass in cls.__mro__:
        if klass is not object:
            for name, member in vars(klass).items():
                members.setdefault(name, member)
    return members


# Every public call of the store rides out outages the same way (StoreBase._with_retry).
for _name, _method in _own_members(JobStore).items():
    if not _name.startswith("_") and callable(_method) and _name not in ("close", "failing_fast", "open"):
        setattr(JobStore, _name, _retried(_method))


def _conforms(
    store: JobStore,
) -> tuple[IntakeStore, LifecycleStore, WorkerStore, SupervisorStore, HookStore, ReaderStore, OperatorStore]:
    """Never called: mypy checks here that JobStore implements every role of
    store/values.py, so a signature that drifts from its protocol fails the type check."""
    return store, store, store, store, store, store, store
