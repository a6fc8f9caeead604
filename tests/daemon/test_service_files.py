"""The files an operator installs: the systemd unit, sysusers.d and tmpfiles.d
entries, the Prometheus alerts and the Grafana dashboard. Each is checked by
the tool that will read it (systemd-analyze, systemd-sysusers,
systemd-tmpfiles, promtool), and the dashboard and alerts are checked against
the metrics whisperd really exposes."""

from __future__ import annotations

import itertools
import json
import os
import re
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_tool
from tests.fake_nvml import ScriptedProbe
from whisperd.daemon.views import store_job_counts, store_running_jobs
from whisperd.devices.probe import DeviceInfo
from whisperd.jobs import FileIdentity, JobSpec
from whisperd.metrics.registry import Metrics
from whisperd.metrics.state import WorkerView
from whisperd.store.job_store import JobStore

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "whisperd.service"
SYSUSERS = ROOT / "systemd" / "whisperd.sysusers.conf"
TMPFILES = ROOT / "systemd" / "whisperd.tmpfiles.conf"
ALERTS = ROOT / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "grafana" / "whisperd.json"

# Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"instance", "job"}


def need(tool: str) -> str:
    return require_tool(tool, "prometheus" if tool == "promtool" else "systemd")


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, input=stdin, capture_output=True, text=True, check=False, timeout=120)


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> every value (DeviceAllow= and friends repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


# -- systemd unit --------------------------------------------------------------


def unit_with_stub_binary(tmp_path: Path) -> Path:
    """A copy of the unit whose ExecStart names a stub executable.

    systemd-analyze verify checks that the ExecStart binary exists and is
    executable; /usr/bin/whisperd only exists once whisperd is installed, so
    the copy points at a stub in tmp_path and keeps everything else as is.
    """
    stub = tmp_path / "bin" / "whisperd"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    text = UNIT.read_text()
    assert "ExecStart=/usr/bin/whisperd run" in text
    copy = tmp_path / "whisperd.service"
    for key in ("ExecStart", "ExecReload"):
        text = text.replace(f"{key}=/usr/bin/whisperd ", f"{key}={stub} ")
    copy.write_text(text)
    return copy


def test_the_unit_passes_systemd_analyze_verify_without_warnings(tmp_path: Path) -> None:
    need("systemd-analyze")
    unit = unit_with_stub_binary(tmp_path)
    result = run("systemd-analyze", "verify", "--man=no", str(unit))
    # verify exits 0 even for unknown keys or bad values; those show as
    # messages naming the file, so any message about the unit fails the test.
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if "whisperd" in line]
    assert result.returncode == 0 and complaints == [], result.stdout + result.stderr


def test_verify_would_catch_a_missing_binary(tmp_path: Path) -> None:
    need("systemd-analyze")
    unit = tmp_path / "whisperd.service"
    unit.write_text(UNIT.read_text().replace("/usr/bin/whisperd", str(tmp_path / "missing")))
    result = run("systemd-analyze", "verify", "--man=no", str(unit))
    assert result.returncode != 0 and "missing" in result.stdout + result.stderr


def test_the_unit_is_a_hardened_notify_service() -> None:
    unit = parse_unit(UNIT.read_text())
    service = unit["Service"]
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "ExecStart": "/usr/bin/whisperd run --config /etc/whisperd/config.toml",
        "ExecReload": "/usr/bin/whisperd reload --config /etc/whisperd/config.toml",
        "Restart": "on-failure",
        "WatchdogSec": "60",
        "User": "whisperd",
        "Group": "whisperd",
        "StateDirectory": "whisperd",
        "UMask": "0027",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ReadWritePaths": "/srv/transcribe",
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "SystemCallArchitectures": "native",
        "LockPersonality": "yes",
        "DevicePolicy": "closed",
        "CapabilityBoundingSet": "",
    }
    for key, value in expected.items():
        assert service.get(key) == [value], key
    assert "TimeoutStopSec" in service
    assert sorted(service["DeviceAllow"]) == [
        "char-nvidia-caps r",
        "char-nvidia-frontend rw",
        "char-nvidia-uvm rw",
    ]
    # PrivateDevices=yes would hide /dev/nvidia*; MemoryDenyWriteExecute
    # would break numba/triton's JIT.
    assert "PrivateDevices" not in service and "MemoryDenyWriteExecute" not in service
    assert "CUDA_DEVICE_ORDER=PCI_BUS_ID" in service["Environment"]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_every_setting_in_the_unit_has_a_comment_above_it() -> None:
    lines = UNIT.read_text().splitlines()
    uncommented = [
        line
        for before, line in itertools.pairwise(lines)
        if line and not line.startswith(("#", "[")) and not before.startswith("#")
    ]
    assert uncommented == []


def test_systemd_rates_the_sandbox_as_ok(tmp_path: Path) -> None:
    need("systemd-analyze")
    unit = unit_with_stub_binary(tmp_path)
    result = run("systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit))
    if "--offline" in result.stderr:
        pytest.skip("this systemd-analyze has no offline security review")
    match = re.search(
        r"Overall exposure level for whisperd\.service: ([0-9.]+)", result.stdout + result.stderr
    )
    assert match is not None, result.stdout + result.stderr
    # 0 is a fully locked-down service, 10 an unprotected one; systemd calls
    # anything below 3 "OK". Raising this means weakening the sandbox.
    assert float(match.group(1)) < 3.0


@pytest.fixture
def system_root(tmp_path: Path) -> Path:
    """An empty file-system root for systemd-sysusers/tmpfiles --root."""
    if os.geteuid() != 0:
        pytest.skip("creating files owned by another user needs root")
    need("systemd-sysusers")
    need("systemd-tmpfiles")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    return root


def test_sysusers_creates_the_service_user_in_the_gpu_groups(system_root: Path) -> None:
    result = run("systemd-sysusers", f"--root={system_root}", str(SYSUSERS))
    assert result.returncode == 0, result.stderr
    passwd = {
        line.split(":")[0]: line.split(":") for line in (system_root / "etc/passwd").read_text().splitlines()
    }
    groups = {
        line.split(":")[0]: line.split(":") for line in (system_root / "etc/group").read_text().splitlines()
    }
    user = passwd["whisperd"]
    assert user[4] == "whisperd transcription daemon" and user[5] == "/var/lib/whisperd"
    assert int(user[2]) < 1000  # a system user
    assert groups["whisperd"][2] == user[3]  # its own primary group
    assert "whisperd" in groups["video"][3].split(",")
    assert "whisperd" in groups["render"][3].split(",")


def test_tmpfiles_creates_the_inbox_tree_owned_by_the_service(system_root: Path) -> None:
    assert run("systemd-sysusers", f"--root={system_root}", str(SYSUSERS)).returncode == 0
    result = run("systemd-tmpfiles", "--create", f"--root={system_root}", str(TMPFILES))
    assert result.returncode == 0, result.stderr
    uid = int((system_root / "etc/passwd").read_text().split("whisperd:x:")[1].split(":")[0])
    modes = {}
    for name in ("", "inbox", "output", "cancel", "done", "failed"):
        info = (system_root / "srv/transcribe" / name).stat()
        assert (info.st_uid, info.st_gid) == (uid, uid), name
        modes[name] = stat.S_IMODE(info.st_mode)
    # Private to the service and its group; the group may drop and cancel files.
    assert modes == {
        "": 0o750,
        "output": 0o750,
        "done": 0o750,
        "failed": 0o750,
        "inbox": 0o2770,
        "cancel": 0o2770,
    }


# -- the metric names whisperd exposes ---------------------------------------


@pytest.fixture(scope="module")
def exposed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, set[str]]]:
    """Every series name a scrape holds once each hook has fired -> its labels."""
    probe = ScriptedProbe([DeviceInfo(index=0, name="GPU", uuid="GPU-1", memory_total_bytes=1)])
    # A real store with one job running on cuda:0 and one queued, read as the
    # daemon reads it; its first read fails, as a store that is down does.
    store = JobStore.open(f"sqlite:///{tmp_path_factory.mktemp('exposed')}/jobs.db")
    for number in (1, 2):
        spec = JobSpec(inbox="a", inbox_root="/srv/a", rel_path=f"{number}.wav", model="m")
        store.enqueue(spec, FileIdentity(device=1, inode=number, size=1, mtime_ns=number), max_attempts=1)
    claim = store.claim(worker="w", device="cuda:0", lease_seconds=600)
    assert claim is not None
    store.heartbeat(claim.job.id, claim.token, lease_seconds=600, progress=0.5, eta_seconds=30.0)
    # This test's own process stands in for a worker on GPU 0: its memory is real.
    probe.set_process_memory(0, os.getpid(), 512 * 2**20)
    worker = WorkerView(slot="gpu0-0", device="cuda:0", gpu_index=0, pid=os.getpid())
    failures = [ConnectionError("the first scrape finds the store down")]

    def job_counts() -> dict[str, int]:
        if failures:
            raise failures.pop()
        return store_job_counts(store)

    metrics = Metrics(
        job_counts=job_counts,
        running_jobs=lambda: store_running_jobs(store),
        devices=probe,
        version="test",
        workers=lambda: [worker],
        claimable_jobs=lambda: store.claimable_count(["a"]),
    )
    metrics.job_queued("a")
    metrics.job_started("a", "cuda:0", 1)
    metrics.job_finished("a", "done", device="cuda:0", duration_seconds=1, audio_seconds=10)
    metrics.job_retried("a")
    metrics.job_cancelled("a", was_running=True)
    metrics.job_rejected("a", "symlink")
    metrics.worker_restarted("s", "crashed")
    metrics.model_loaded("m", "cuda:0", 1)
    metrics.model_unloaded("m", "cuda:0", "idle")
    metrics.cpu_fallback("m")
    metrics.device_health_changed("cuda:0", healthy=True)
    metrics.watcher_event("created")
    metrics.job_handling_failed("dispose")
    metrics.set_inboxes_paused({"a": True})
    metrics.jobs_pruned(3)
    metrics.hook_delivery("a", "on_done", "delivered")
    metrics.store_error()
    list(metrics.registry.collect())  # the failing scrape
    series: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        assert family.samples, f"{family.name} has no sample: exercise it above"
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    yield series
    store.close()


METRIC_NAME = re.compile(r"\b((?:whisperd|process)_[a-z0-9_]+)\b")
SELECTOR = re.compile(r"\b((?:whisperd|process)_[a-z0-9_]+)\{([^}]*)\}")
BY_CLAUSE = re.compile(r"\bby\s*\(([^)]*)\)")


def check_expression(expr: str, exposed: dict[str, set[str]]) -> list[str]:
    """Problems with a PromQL expression: unknown metrics, unknown labels."""
    problems = []
    used = METRIC_NAME.findall(expr)
    problems += [f"{name} is not exposed" for name in used if name not in exposed]
    for name, matchers in SELECTOR.findall(expr):
        for label in re.findall(r"([a-zA-Z_]\w*)\s*[=!]~?", matchers):
            if label not in exposed.get(name, set()) | TARGET_LABELS:
                problems.append(f"{name} has no label {label}")
    known = set().union(*(exposed.get(name, set()) for name in used), TARGET_LABELS, {"le"})
    for clause in BY_CLAUSE.findall(expr):
        problems += [
            f"no metric in it has label {label}"
            for label in re.split(r"\s*,\s*", clause.strip())
            if label and label not in known
        ]
    return problems


def test_the_expression_checker_catches_typos(exposed: dict[str, set[str]]) -> None:
    assert check_expression("sum by (outcome) (rate(whisperd_jobs_finished_total[5m]))", exposed) == []
    assert check_expression("rate(whisperd_jobs_finshed_total[5m])", exposed) != []
    assert check_expression('whisperd_jobs{stat="queued"}', exposed) != []
    assert check_expression("sum by (file) (whisperd_jobs)", exposed) != []


# -- Grafana dashboard ---------------------------------------------------------


def dashboard_expressions(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            # Panel targets hold "expr"; template variables hold "definition".
            if key in ("expr", "definition") and isinstance(value, str):
                yield value
            else:
                yield from dashboard_expressions(value)
    elif isinstance(node, list):
        for item in node:
            yield from dashboard_expressions(item)


def test_the_dashboard_only_queries_metrics_whisperd_exposes(exposed: dict[str, set[str]]) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = list(dashboard_expressions(dashboard))
    assert len(expressions) > 20
    problems = {expr: check_expression(expr, exposed) for expr in expressions}
    assert {expr: p for expr, p in problems.items() if p} == {}


def test_the_dashboard_is_importable_with_a_data_source_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]


def test_the_dashboard_has_the_panels_operators_need() -> None:
    titles = " | ".join(p["title"] for p in json.loads(DASHBOARD.read_text())["panels"]).lower()
    for wanted in (
        "queue depth by state",
        "throughput",
        "realtime factor p50 / p95",
        "queue wait p95",
        "job outcomes",
        "gpu memory used / total",
        "gpu health",
        "temperature",
        "model loads",
        "unloads by reason",
        "worker restarts",
        "cancels",
        "running jobs eta",
        "worker memory",
    ):
        assert wanted in titles, wanted


# -- Prometheus alerts ---------------------------------------------------------


def test_the_alert_rules_pass_promtool() -> None:
    need("promtool")
    result = run("promtool", "check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 9 rules found" in result.stdout


def test_the_alerts_only_use_metrics_whisperd_exposes(exposed: dict[str, set[str]]) -> None:
    expressions = re.findall(r"expr: \|\n((?:\s{10}.*\n)+)|expr: (.+)", ALERTS.read_text())
    flat = [block or line for block, line in expressions]
    assert len(flat) == 9
    problems = {expr: check_expression(expr, exposed) for expr in flat}
    assert {expr: p for expr, p in problems.items() if p} == {}


INSTANCE = {"instance": "host:9310", "job": "whisperd"}


def series(name: str, values: str, **labels: str) -> dict[str, str]:
    selector = ", ".join(f'{k}="{v}"' for k, v in {**labels, **INSTANCE}.items())
    return {"series": f"{name}{{{selector}}}", "values": values}


def alert(name: str, at: str, *expected: dict[str, Any]) -> dict[str, Any]:
    return {"eval_time": at, "alertname": name, "exp_alerts": list(expected)}


STUCK = {
    "exp_labels": {"severity": "warning", "instance": "host:9310"},
    "exp_annotations": {
        "summary": "whisperd on host:9310 has queued jobs but finished none in 15 minutes",
        "description": "3 jobs are queued. Look at `whisperd status` and the worker logs "
        "(journalctl -u whisperd).",
    },
}


def promtool_test(tmp_path: Path, tests: list[dict[str, Any]]) -> None:
    need("promtool")
    # YAML is a superset of JSON, so the test file is written as JSON.
    spec = {"rule_files": [str(ALERTS)], "evaluation_interval": "1m", "tests": tests}
    path = tmp_path / "alerts_test.yml"
    path.write_text(json.dumps(spec))
    result = run("promtool", "test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_stuck_queue_alerts_after_15_minutes_and_a_moving_one_does_not(tmp_path: Path) -> None:
    stuck = {
        "interval": "1m",
        "input_series": [
            series("whisperd_jobs_claimable", "3x60"),
            series("whisperd_jobs_finished_total", "5x60", inbox="a", outcome="done"),
        ],
        "alert_rule_test": [alert("WhisperdQueueStuck", "10m"), alert("WhisperdQueueStuck", "40m", STUCK)],
    }
    never_finished = {  # a daemon whose first job never ends has no finished series at all
        "interval": "1m",
        "input_series": [series("whisperd_jobs_claimable", "3x60")],
        "alert_rule_test": [alert("WhisperdQueueStuck", "20m", STUCK)],
    }
    moving = {
        "interval": "1m",
        "input_series": [
            series("whisperd_jobs_claimable", "3x60"),
            series("whisperd_jobs_finished_total", "0+1x60", inbox="a", outcome="done"),
        ],
        "alert_rule_test": [alert("WhisperdQueueStuck", "40m")],
    }
    only_retrying = {  # attempts that put their job back end nothing: still stuck
        "interval": "1m",
        "input_series": [
            series("whisperd_jobs_claimable", "3x60"),
            series("whisperd_jobs_finished_total", "0+1x60", inbox="a", outcome="retry"),
            series("whisperd_jobs_finished_total", "0+1x60", inbox="a", outcome="lease_lost"),
        ],
        "alert_rule_test": [alert("WhisperdQueueStuck", "40m", STUCK)],
    }
    other_hosts_work = {  # the store's queue is full, but of inboxes this host does not serve (or paused)
        "interval": "1m",
        "input_series": [
            series("whisperd_jobs", "3x60", state="queued"),
            series("whisperd_jobs_claimable", "0x60"),
        ],
        "alert_rule_test": [alert("WhisperdQueueStuck", "40m")],
    }
    promtool_test(tmp_path, [stuck, never_finished, moving, only_retrying, other_hosts_work])


def test_a_high_failure_rate_alerts_and_a_few_failures_do_not(tmp_path: Path) -> None:
    failing = {
        "interval": "1m",
        "input_series": [
            series("whisperd_jobs_finished_total", "0+1x60", inbox="a", outcome="done"),
            series("whisperd_jobs_finished_total", "0+1x60", inbox="a", outcome="failed"),
        ],
        "alert_rule_test": [
            alert(
                "WhisperdJobFailureRateHigh",
                "30m",
                {
                    "exp_labels": {"severity": "warning", "instance": "host:9310"},
                    "exp_annotations": {
                        "summary": "More than 20% of whisperd jobs on host:9310 failed "
                        "in the last 15 minutes",
                        "description": "Failure ratio 50%. The failed/ folder holds each source with a "
                        ".error.txt saying why.",
                    },
                },
            )
        ],
    }
    quiet = {  # 2 failures out of 4 jobs in an hour: below the volume floor
        "interval": "1m",
        "input_series": [
            series(
                "whisperd_jobs_finished_total",
                "0 0 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 2x40",
                inbox="a",
                outcome="done",
            ),
            series(
                "whisperd_jobs_finished_total",
                "0 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 2x40",
                inbox="a",
                outcome="failed",
            ),
        ],
        "alert_rule_test": [alert("WhisperdJobFailureRateHigh", "25m")],
    }
    refused_files = {  # oversize/non-media files and retries are not failed jobs
        "interval": "1m",
        "input_series": [
            series("whisperd_jobs_finished_total", "0+1x60", inbox="a", outcome="done"),
            series("whisperd_jobs_finished_total", "0+5x60", inbox="a", outcome="rejected"),
            series("whisperd_jobs_finished_total", "0+5x60", inbox="a", outcome="retry"),
        ],
        "alert_rule_test": [alert("WhisperdJobFailureRateHigh", "30m")],
    }
    promtool_test(tmp_path, [failing, quiet, refused_files])


def test_an_unhealthy_gpu_alerts_after_5_minutes(tmp_path: Path) -> None:
    test = {
        "interval": "1m",
        "input_series": [series("whisperd_gpu_healthy", "1 1 0x30", device="cuda:0")],
        "alert_rule_test": [
            alert("WhisperdGpuUnhealthy", "5m"),
            alert(
                "WhisperdGpuUnhealthy",
                "10m",
                {
                    "exp_labels": {"severity": "critical", "device": "cuda:0", **INSTANCE},
                    "exp_annotations": {
                        "summary": "GPU cuda:0 on host:9310 is unhealthy",
                        "description": "See whisperd_gpu_throttled and whisperd_gpu_ecc_uncorrected_errors, "
                        "and nvidia-smi -q on the host.",
                    },
                },
            ),
        ],
    }
    promtool_test(tmp_path, [test])


def test_a_down_daemon_alerts_after_2_minutes(tmp_path: Path) -> None:
    test = {
        "interval": "1m",
        "input_series": [{"series": 'up{job="whisperd", instance="host:9310"}', "values": "1 1 0x10"}],
        "alert_rule_test": [
            alert(
                "WhisperdDown",
                "6m",
                {
                    "exp_labels": {"severity": "critical", **INSTANCE},
                    "exp_annotations": {
                        "summary": "whisperd on host:9310 is down or not answering on its metrics port",
                        "description": "systemctl status whisperd; journalctl -u whisperd -n 100",
                    },
                },
            )
        ],
    }
    promtool_test(tmp_path, [test])


def test_a_stale_rescan_alerts_but_a_fresh_start_does_not(tmp_path: Path) -> None:
    expected = {
        "exp_labels": {"severity": "warning", **INSTANCE},
        "exp_annotations": {
            "summary": "whisperd on host:9310 has not rescanned its inboxes for over an hour",
            "description": "Files dropped while inotify events were lost will not be picked up. "
            "Check the watcher in the journal.",
        },
    }
    stale = {  # rescans stopped at t=5m; the daemon started at t=0
        "interval": "1m",
        "input_series": [
            series("whisperd_last_rescan_timestamp_seconds", "0 60 120 180 240 300x120"),
            series("whisperd_rescan_interval_seconds", "60x125"),
            series("process_start_time_seconds", "0x125"),
        ],
        "alert_rule_test": [
            alert("WhisperdRescanStale", "60m"),
            alert("WhisperdRescanStale", "80m", expected),
        ],
    }
    rescanning = {  # a rescan every minute
        "interval": "1m",
        "input_series": [
            series("whisperd_last_rescan_timestamp_seconds", "0+60x125"),
            series("whisperd_rescan_interval_seconds", "60x125"),
            series("process_start_time_seconds", "0x125"),
        ],
        "alert_rule_test": [alert("WhisperdRescanStale", "120m")],
    }
    switched_off = {  # rescan_seconds = 0 (documented): no rescan ever, no alert
        "interval": "1m",
        "input_series": [
            series("whisperd_last_rescan_timestamp_seconds", "0x125"),
            series("whisperd_rescan_interval_seconds", "0x125"),
            series("process_start_time_seconds", "0x125"),
        ],
        "alert_rule_test": [alert("WhisperdRescanStale", "120m")],
    }
    slow_period = {  # every 2 hours: a 90-minute-old rescan is on time
        "interval": "1m",
        "input_series": [
            series("whisperd_last_rescan_timestamp_seconds", "0x125"),
            series("whisperd_rescan_interval_seconds", "7200x125"),
            series("process_start_time_seconds", "0x125"),
        ],
        "alert_rule_test": [alert("WhisperdRescanStale", "100m")],
    }
    promtool_test(tmp_path, [stale, rescanning, switched_off, slow_period])


def test_an_unreachable_store_alerts_after_2_minutes_and_a_short_outage_does_not(tmp_path: Path) -> None:
    expected = {
        "exp_labels": {"severity": "critical", **INSTANCE},
        "exp_annotations": {
            "summary": "whisperd on host:9310 cannot reach its job store",
            "description": "journalctl -u whisperd shows store.unreachable with the error; "
            "check the disk or the database server.",
        },
    }
    down = {
        "interval": "1m",
        "input_series": [series("whisperd_store_up", "1 1 0x10")],
        "alert_rule_test": [
            alert("WhisperdStoreUnreachable", "3m"),
            alert("WhisperdStoreUnreachable", "6m", expected),
        ],
    }
    blip = {  # one minute away, then back
        "interval": "1m",
        "input_series": [series("whisperd_store_up", "1 1 0 1x10")],
        "alert_rule_test": [alert("WhisperdStoreUnreachable", "6m")],
    }
    promtool_test(tmp_path, [down, blip])


def test_stuck_sources_alert_after_15_minutes_and_none_do_not(tmp_path: Path) -> None:
    expected = {
        "exp_labels": {"severity": "warning", **INSTANCE},
        "exp_annotations": {
            "summary": "whisperd on host:9310 could not move 2 finished sources out of the inbox",
            "description": "whisperd status lists them; fix the permissions of done/ or failed/ "
            "and run whisperd retry ID.",
        },
    }
    stuck = {
        "interval": "1m",
        "input_series": [series("whisperd_sources_stuck", "0 2x30")],
        "alert_rule_test": [
            alert("WhisperdSourcesStuck", "10m"),
            alert("WhisperdSourcesStuck", "20m", expected),
        ],
    }
    none = {"interval": "1m", "input_series": [series("whisperd_sources_stuck", "0x30")]}
    none["alert_rule_test"] = [alert("WhisperdSourcesStuck", "20m")]
    promtool_test(tmp_path, [stuck, none])


def test_a_device_out_of_service_and_restarting_workers_alert(tmp_path: Path) -> None:
    out_of_service = {
        "interval": "1m",
        "input_series": [series("whisperd_device_healthy", "1 0x10", device="cuda:1")],
        "alert_rule_test": [
            alert("WhisperdDeviceOutOfService", "3m"),
            alert(
                "WhisperdDeviceOutOfService",
                "8m",
                {
                    "exp_labels": {"severity": "critical", "device": "cuda:1", **INSTANCE},
                    "exp_annotations": {
                        "summary": "whisperd stopped using cuda:1 on host:9310",
                        "description": "Jobs run on the remaining devices (or the CPU). "
                        "The journal says why the device was marked unhealthy.",
                    },
                },
            ),
        ],
    }
    restarting = {  # five restarts in ten minutes, then none
        "interval": "1m",
        "input_series": [series("whisperd_worker_restarts_total", "0 1 2 3 4 5x40", reason="crashed")],
        "alert_rule_test": [
            alert("WhisperdWorkersRestarting", "2m"),
            alert(
                "WhisperdWorkersRestarting",
                "6m",
                {
                    "exp_labels": {"severity": "warning", "reason": "crashed", "instance": "host:9310"},
                    "exp_annotations": {
                        "summary": "whisperd on host:9310 restarted workers 5 times in 15 minutes (crashed)",
                        "description": "journalctl -u whisperd shows each worker.exited event "
                        "with its exit code.",
                    },
                },
            ),
            alert("WhisperdWorkersRestarting", "30m"),
        ],
    }
    promtool_test(tmp_path, [out_of_service, restarting])
