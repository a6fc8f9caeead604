"""The daemon's completion-hook runner.

The deliveries a job's end owes are in the store (store/hooks.py, written
with the job's end). A few runner threads take due ones of this daemon's
inboxes, make one try each (hooks/delivery.py) and record the outcome:
delivered, due again after a doubling wait, or failed after hook_attempts
tries. The threads touch nothing but the store and their own child
processes, so a hook that hangs holds one thread until its timeout and
never the main loop, intake, claims, or the other threads' deliveries.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from whisperd import logs
from whisperd.config import InboxConfig
from whisperd.hooks.delivery import TryResult, post_webhook, run_program
from whisperd.jobs import Job
from whisperd.store import report as job_report
from whisperd.store.values import HookDelivery

if TYPE_CHECKING:
    from whisperd.store.job_store import JobStore

log = logs.get_logger("whisperd.hooks")

# Deliveries made at once: a hanging hook holds one of them until its timeout.
RUNNER_THREADS = 2
# An idle runner thread looks for due deliveries this often, while any inbox
# has hooks; with none configured it sleeps until a reload adds one.
POLL_SECONDS = 0.5
# A delivery waits for the job's source to move to done/ or failed/ (so the
# hook sees where it is now), at most this long (a stuck move).
MOVE_WAIT_SECONDS = 30.0
# Waits between tries: 1 s, doubling, at most this long.
RETRY_BASE_SECONDS = 1.0
RETRY_MAX_SECONDS = 300.0
# A claimed delivery is someone's for its timeout twice over plus this; a
# runner killed meanwhile leaves it to be tried again after that.
LEASE_MARGIN_SECONDS = 30.0

# outcome label of whisperd_hook_deliveries_total per try.
DELIVERED, RETRIED, FAILED = "delivered", "retried", "failed"
OnOutcome = Callable[[str, str, str], None]


def retry_delay(attempts: int) -> float:
    return float(min(RETRY_MAX_SECONDS, RETRY_BASE_SECONDS * 2.0 ** max(0, attempts - 1)))


def hook_environment(job: Job, document: Mapping[str, Any], kind: str, attempt: int) -> dict[str, str]:
    """The WHISPERD_* variables a hook program gets (README: Completion hooks)."""
    facts = document["job"]
    return {
        "WHISPERD_HOOK": kind,
        "WHISPERD_ATTEMPT": str(attempt),
        "WHISPERD_JOB_ID": str(job.id),
        "WHISPERD_INBOX": job.spec.inbox,
        "WHISPERD_FILE": job.spec.rel_path,
        "WHISPERD_STATE": job.state.value,
        "WHISPERD_SOURCE": facts["source_now"] or "",
        "WHISPERD_SOURCE_WHERE": facts["source_where"],
        "WHISPERD_OUTPUTS": os.pathsep.join(job.outputs),
        "WHISPERD_ERROR": job.last_error or "",
    }


class HookRunner:
    """Owns the runner threads: start() / stop(timeout)."""

    def __init__(
        self,
        store: JobStore,
        inboxes: Mapping[str, InboxConfig],
        *,
        on_outcome: OnOutcome | None = None,
        threads: int = RUNNER_THREADS,
    ) -> None:
        self._store = store
        self._lock = threading.Lock()
        # Notified by set_inboxes() and stop(): what an idle thread waits on.
        self._changed = threading.Condition(self._lock)
        self._inboxes = dict(inboxes)
        self._on_outcome = on_outcome
        self._stop = threading.Event()
        # Daemon threads: a try stuck past stop()'s wait (a webhook answering
        # byte by byte) must not keep the process from exiting; its delivery
        # stays owed and is tried again after the restart.
        self._threads = [
            threading.Thread(target=self._loop, name=f"whisperd-hooks-{n}", daemon=True)
            for n in range(threads)
        ]

    def set_inboxes(self, inboxes: Mapping[str, InboxConfig]) -> None:
        """A reload: deliveries from now on use these inboxes' hooks."""
        with self._changed:
            self._inboxes = dict(inboxes)
            self._changed.notify_all()

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Running hook programs are killed; their deliveries stay owed."""
        self._stop.set()
        with self._changed:
            self._changed.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            if thread.is_alive():
                thread.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in self._threads if t.is_alive()]
        if stuck:
            log.warning("hook.stop_timed_out", threads=stuck, hint="their deliveries stay owed")

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                made = self.run_once()
            except Exception as exc:  # noqa: BLE001 - a store outage or a bug must not end the thread
                if self._stop.is_set():
                    return
                log.error("hook.runner_error", error=f"{type(exc).__name__}: {exc}")
                made = False
            if not made:
                self._wait_for_work()

    def _wait_for_work(self) -> None:
        """Until a delivery may be due: the next poll while some inbox has
        hooks; otherwise until a reload gives one hooks (or stop()). A daemon
        without hooks then never wakes these threads, which on a busy CPU
        would steal time from the engine's threads."""
        with self._changed:
            if self._stop.is_set():
                return
            if self._any_hooks():
                self._changed.wait(POLL_SECONDS)
            else:
                self._changed.wait_for(lambda: self._stop.is_set() or self._any_hooks())

    def _any_hooks(self) -> bool:
        # Called with self._lock held.
        return any(inbox.hook_kinds() for inbox in self._inboxes.values())

    def run_once(self) -> bool:
        """Make one try at the delivery due longest; False when none was due."""
        with self._lock:
            inboxes = dict(self._inboxes)
        hooks = {name: inbox.hook_kinds() for name, inbox in inboxes.items() if inbox.hook_kinds()}
        if not hooks:
            return False
        longest = max(inboxes[name].hook_timeout_seconds for name in hooks)
        delivery = self._store.claim_hook_delivery(
            hooks, lease=2 * longest + LEASE_MARGIN_SECONDS, moved_before=time.time() - MOVE_WAIT_SECONDS
        )
        if delivery is None:
            return False
        job = self._store.get(delivery.job_id)
        inbox = None if job is None else inboxes.get(job.spec.inbox)
        if job is None or inbox is None:  # pruned meanwhile, or its inbox left the config
            self._store.record_hook_outcome(delivery, error="the job or its inbox is gone", retry_at=None)
            return True
        try:
            result = self._try(delivery, job, inbox)
        except Exception as exc:  # noqa: BLE001 - a surprise is a failed try, counted toward hook_attempts
            result = TryResult(error=f"{type(exc).__name__}: {exc}")
        self._record(delivery, job, inbox, result)
        return True

    def _try(self, delivery: HookDelivery, job: Job, inbox: InboxConfig) -> TryResult:
        document = self._document(job)
        body = json.dumps(document, ensure_ascii=True).encode()
        if delivery.kind == "webhook":
            return post_webhook(
                inbox.webhook_url,
                document=body,
                kind=delivery.kind,
                timeout=inbox.hook_timeout_seconds,
                cancel=self._stop,
            )
        argv = inbox.on_done if delivery.kind == "on_done" else inbox.on_failed
        return run_program(
            argv,
            env=hook_environment(job, document, delivery.kind, delivery.attempts),
            document=body,
            timeout=inbox.hook_timeout_seconds,
            cancel=self._stop,
        )

    def _document(self, job: Job) -> dict[str, Any]:
        """`whisperd show ID --json` of the job: the one JSON shape of a job."""
        stuck = self._store.source_stuck_reason(job.id) if job.disposed_at is None else None
        return job_report.show_document(
            job, self._store.attempts_of(job.id), stuck, self._store.hook_deliveries_of(job.id)
        )

    def _record(self, delivery: HookDelivery, job: Job, inbox: InboxConfig, result: TryResult) -> None:
        fields = {
            **logs.job_fields(job),
            "kind": delivery.kind,
            "attempt": delivery.attempts,
            "output": result.output,
        }
        if result.error is None:
            if not self._store.record_hook_outcome(delivery, error=None, retry_at=None):
                log.warning(
                    "hook.late", **fields, hint="delivered after its lease ran out; tried again elsewhere"
                )
            log.info("hook.delivered", **fields)
            self._count(inbox.name, delivery.kind, DELIVERED)
            return
        stopping = self._stop.is_set()
        if stopping or delivery.attempts < inbox.hook_attempts:
            # Cut short by a stop: due again at once, after the restart.
            wait = 0.0 if stopping else retry_delay(delivery.attempts)
            self._store.record_hook_outcome(delivery, error=result.error, retry_at=time.time() + wait)
            log.warning("hook.retry", **fields, error=result.error, retry_in_seconds=wait)
            self._count(inbox.name, delivery.kind, RETRIED)
            return
        self._store.record_hook_outcome(delivery, error=result.error, retry_at=None)
        given_up = f"given up after {delivery.attempts} tries (hook_attempts)"
        log.error("hook.failed", **fields, error=result.error, hint=given_up)
        self._count(inbox.name, delivery.kind, FAILED)

    def _count(self, inbox: str, kind: str, outcome: str) -> None:
        if self._on_outcome is not None:
            self._on_outcome(inbox, kind, outcome)
