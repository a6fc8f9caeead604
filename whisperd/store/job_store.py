"""`JobStore`: the job store, the single source of truth about every job.

One SQLAlchemy Core implementation serves SQLite (one host, several processes)
and PostgreSQL (several hosts). Every state change is a short transaction that
checks the state it expects (compare-and-set), so a job is claimed by one
worker at a time and every write by a worker is fenced by its claim token.
Each verb that rides out an outage says so (`@outage_retried`, base.py).

JobStore is assembled from its parts, one concern each:

| part | its verbs |
| --- | --- |
| enqueue.py | files becoming jobs |
| attempts.py | claim, the worker's fenced writes, end_attempt, lease expiry, cancel, retry |
| reads.py | read-only queries about jobs |
| moves.py | owed, failed and stuck source moves |
| upkeep.py | retention, vacuum, realtime factor, model memory |
| registry.py | instances, paused inboxes, hooks, waiting files |

and stands on base.py (open, close, transactions, the fenced update),
database.py (URL, engine, clock, migrations) and schema.py (the tables).
"""

from __future__ import annotations

from whisperd.store.attempts import AttemptsMixin
from whisperd.store.enqueue import EnqueueMixin
from whisperd.store.moves import MovesMixin
from whisperd.store.reads import ReadsMixin
from whisperd.store.registry import RegistryMixin
from whisperd.store.upkeep import UpkeepMixin


class JobStore(EnqueueMixin, AttemptsMixin, ReadsMixin, MovesMixin, UpkeepMixin, RegistryMixin):
    """Jobs in a database. Thread-safe; any number of processes and hosts may
    open the same database. Build with JobStore.open(url); close() when done."""
