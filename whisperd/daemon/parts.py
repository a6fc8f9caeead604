"""Parts of `whisperd run` built from the Config: the inbox folders, the watcher's
specs and the watcher wired to intake, the metrics server, a re-read config
for a reload, and the waits before READY=1.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

from whisperd import logs
from whisperd.config import Config, InboxConfig
from whisperd.config_load import load_config
from whisperd.engines.compute_types import check_compute_types
from whisperd.errors import ConfigError, WhisperdError
from whisperd.intake.intake import Intake
from whisperd.metrics.registry import Metrics
from whisperd.metrics.server import MetricsServer
from whisperd.watch.rules import WatchSpec
from whisperd.watch.watcher import Watcher
from whisperd.workers.pool import WorkerPool

log = logs.get_logger("whisperd.daemon.root")

# READY=1 waits this long for the first worker to import torch and open the
# store (seconds on a warm machine; keep well under the unit's TimeoutStartSec).
WORKER_READY_TIMEOUT_SECONDS = 60.0
# READY waits for the files found at start to become jobs: settle_seconds
# plus this much for looking at and queueing them (intake's share included);
# after it, READY anyway.
START_SCAN_MARGIN_SECONDS = 10.0


def make_folders(inboxes: Sequence[InboxConfig]) -> None:
    for inbox in inboxes:
        for folder in (inbox.path, inbox.output, inbox.cancel, inbox.done, inbox.failed):
            os.makedirs(folder, exist_ok=True)


def watch_spec(inbox: InboxConfig) -> WatchSpec:
    return WatchSpec(
        name=inbox.name,
        root=inbox.path,
        cancel_dir=inbox.cancel,
        mode=inbox.watch,
        allow_symlinks=inbox.allow_symlinks,
    )


def make_watcher(config: Config, intake: Intake) -> Watcher:
    """The watcher of every inbox, handing what it finds to intake."""
    return Watcher(
        [watch_spec(i) for i in config.inboxes],
        settle_seconds=config.daemon.settle_seconds,
        rescan_seconds=config.daemon.rescan_seconds,
        on_settled=intake.on_settled,
        on_settled_many=intake.on_settled_many,
        on_cancel=intake.on_cancel,
        on_rejected=intake.on_rejected,
    )


def start_metrics_server(config: Config, metrics: Metrics) -> MetricsServer | None:
    """The started HTTP server, None when [metrics] is disabled; a port that
    cannot be bound refuses the start."""
    if not config.metrics.enabled:
        return None
    server = MetricsServer(metrics, host=config.metrics.host, port=config.metrics.port)
    try:
        server.start()
    except OSError as exc:
        raise WhisperdError(
            f"{config.source}: [metrics] {exc}; choose another port or set enabled = false"
        ) from exc
    return server


def reread_config(config: Config, devices: Callable[[], Sequence[str]]) -> Config | None:
    """A reload's new config, checked and with its folders made; None (and
    logged) when it is refused and the current one stays in force."""
    try:
        fresh = load_config(config.source)
        check_compute_types(fresh, devices())
        make_folders(fresh.inboxes)
    except (ConfigError, OSError) as exc:
        log.error("config.reload_failed", error=str(exc), hint="the previous configuration stays in force")
        return None
    return fresh


def wait_for_start_scan(watcher: Watcher, intake: Intake, *, settle_seconds: float) -> None:
    """READY promises that files dropped while whisperd was down are jobs."""
    scan_deadline = time.monotonic() + settle_seconds + START_SCAN_MARGIN_SECONDS
    settled = watcher.wait_start_settled(scan_deadline - time.monotonic())
    if not (settled and intake.wait_idle(max(0.0, scan_deadline - time.monotonic()))):
        log.warning(
            "daemon.start_scan_pending",
            hint="files found at start are still settling; they are queued once they stop changing",
        )


def wait_for_a_worker(pool: WorkerPool) -> None:
    if pool.size() and not pool.wait_for_a_worker(WORKER_READY_TIMEOUT_SECONDS):
        log.warning(
            "daemon.workers_pending",
            seconds=WORKER_READY_TIMEOUT_SECONDS,
            hint="no worker finished starting (importing torch) in time; jobs wait until one has",
        )
