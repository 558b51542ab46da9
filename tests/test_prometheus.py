"""The shipped Grafana dashboard and alert rules against a real Prometheus (Debian's
`prometheus`, started on a free port with a temporary configuration), scraping a real
`mercli metrics --listen` over a spool that route and dispatch worked on: every rule loads and
evaluates, every dashboard query runs, and the failing-target alert fires when dispatch
gives up on jobs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mercli.spool import ERROR, Spool
from tests.kit import ROOT
from tests.netkit import free_port, port_open, wait_until
from tests.test_dispatch import dicom_target, dispatch_once, rules_for
from tests.test_dispatch import routed as route_series
from tests.test_metrics import expressions

GRAFANA = ROOT / "examples" / "grafana"
CONFIG = """\
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: ["{rules}"]
scrape_configs:
  - job_name: mercli
    static_configs:
      - targets: ["127.0.0.1:{metrics_port}"]
"""
# Grafana's variables in the dashboard's queries, as Grafana would fill them in
GRAFANA_VARIABLES = {"$instance": ".*", "$__rate_interval": "1m"}


def _prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:  # a missing peer is a failure, never a skip: `make setup` installs it
        pytest.fail("prometheus is missing: run `make setup` (Debian package prometheus)")
    return found


class Prometheus:
    """A Prometheus server on loopback; `api(path, **query)` returns the answer's data."""

    def __init__(self, folder: Path, metrics_port: int) -> None:
        folder.mkdir()
        config = folder / "prometheus.yml"
        config.write_text(CONFIG.format(rules=GRAFANA / "alerts.yml", metrics_port=metrics_port))
        self.port = free_port()
        self.log = (folder / "prometheus.log").open("wb")
        self.process = subprocess.Popen(
            [
                _prometheus_binary(),
                f"--config.file={config}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=self.log,
        )
        wait_until(self._ready, timeout=60, what="prometheus to be ready")

    def _ready(self) -> bool:
        assert self.process.poll() is None, self.logs()
        try:
            url = f"http://127.0.0.1:{self.port}/-/ready"
            with urllib.request.urlopen(url, timeout=2) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False

    def api(self, path: str, **query: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        with urllib.request.urlopen(url, timeout=10) as answer:
            document = json.loads(answer.read())
        assert document["status"] == "success", document
        return document["data"]

    def logs(self) -> str:
        return Path(self.log.name).read_text()[-3000:]

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self.log.close()


@pytest.fixture
def exporter(spool: Spool) -> Iterator[int]:
    port = free_port()
    command = [sys.executable, "-m", "mercli", "metrics", "--spool", str(spool.root)]
    process = subprocess.Popen([*command, "-q", "--listen", f"127.0.0.1:{port}"])
    try:
        wait_until(lambda: port_open(port), what="mercli metrics to listen")
        yield port
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture
def prometheus(tmp_path: Path, exporter: int) -> Iterator[Prometheus]:
    server = Prometheus(tmp_path / "prometheus", exporter)
    yield server
    server.close()


def test_promtool_accepts_the_alert_rules() -> None:
    promtool = shutil.which("promtool")
    assert promtool is not None, "promtool is missing: run `make setup` (Debian prometheus)"
    result = subprocess.run(
        [promtool, "check", "rules", str(GRAFANA / "alerts.yml")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def _fail_one_job(tmp_path: Path, spool: Spool, rules: Path, series: str) -> None:
    """Route a series to the dead PACS and let dispatch give up on it (one attempt)."""
    route_series(tmp_path / series, spool, rules, {series: 2})
    assert dispatch_once(spool).returncode == 5  # unreachable, failed for good


def _scraped(prometheus: Prometheus, query: str) -> list[Any]:
    return list(prometheus.api("query", query=query)["result"])


def test_alerts_and_dashboard_queries_on_a_real_prometheus(
    tmp_path: Path, spool: Spool, exporter: int, prometheus: Prometheus
) -> None:
    rules = rules_for(tmp_path, dicom_target("pacs", free_port(), max_attempts=1), '"pacs"')
    _fail_one_job(tmp_path, spool, rules, "1.2.501")
    failed = 'mercli_failed_total{stage="dispatch",target="pacs"}'
    wait_until(
        lambda: [r["value"][1] for r in _scraped(prometheus, failed)] == ["1"],
        timeout=30,
        what=f"prometheus to scrape one failure\n{prometheus.logs()}",
    )
    _fail_one_job(tmp_path, spool, rules, "1.2.502")
    assert len(spool.items(ERROR)) == 2

    def firing() -> list[dict[str, Any]]:
        alerts = prometheus.api("alerts")["alerts"]
        return [a for a in alerts if a["labels"]["alertname"] == "MercliTargetFailing"]

    wait_until(lambda: firing() and firing()[0]["state"] == "firing", timeout=30,
               what="MercliTargetFailing to fire")  # fmt: skip
    (alert,) = firing()
    assert alert["labels"]["target"] == "pacs" and alert["labels"]["severity"] == "critical"

    groups = prometheus.api("rules")["groups"]
    loaded = [rule for group in groups for rule in group["rules"]]
    assert len(loaded) >= 7
    wait_until(
        lambda: all(
            rule["health"] == "ok"
            for group in prometheus.api("rules")["groups"]
            for rule in group["rules"]
        ),
        timeout=30,
        what="every alert rule evaluated without error",
    )

    dashboard = json.loads((GRAFANA / "mercli-dashboard.json").read_text())
    queries = [q for q in expressions(dashboard) if not q.startswith("label_values(")]
    assert len(queries) >= 15
    answered = 0
    for query in queries:
        for variable, value in GRAFANA_VARIABLES.items():
            query = query.replace(variable, value)
        assert "$" not in query, query
        result = _scraped(prometheus, query)  # a query Prometheus cannot parse raises
        answered += bool(result)
    print(f"{answered} of {len(queries)} dashboard queries have data")
    assert answered >= len(queries) // 2  # most panels have data after this little work
    (target,) = prometheus.api("targets")["activeTargets"]
    assert target["health"] == "up" and target["labels"]["instance"] == f"127.0.0.1:{exporter}"
