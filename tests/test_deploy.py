"""deploy/: the Prometheus rules pass `promtool check rules` and their unit tests
(`promtool test rules`), the Grafana dashboard is what its script builds, and every
metric the rules and the dashboard name is one Bascule exports, in valid PromQL."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.grafana.build_dashboard import render
from proxy.metrics import Metrics

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
RULES = DEPLOY / "prometheus" / "bascule-rules.yml"
DASHBOARD = DEPLOY / "grafana" / "bascule-dashboard.json"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.fail("promtool is missing: apt-get install prometheus (make test does)")
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=60,
                          check=False)


def test_rules_check_and_their_unit_tests_pass() -> None:
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", str(RULES.with_suffix(".test.yml")))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_the_dashboard_is_what_its_script_builds() -> None:
    assert DASHBOARD.read_text() == render(), (
        f"regenerate it: {sys.executable} deploy/grafana/build_dashboard.py")


def dashboard_exprs() -> list[str]:
    document = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in document["panels"] for t in p.get("targets", [])]


def exported_names() -> set[str]:
    metrics = Metrics(multiprocess=False)
    assert metrics.registry is not None
    return set(metrics.registry._names_to_collectors)


def test_every_metric_named_is_exported_and_the_queries_parse(tmp_path: Path) -> None:
    exported = exported_names()
    exprs = dashboard_exprs()
    rules_text = RULES.read_text()
    named = set(re.findall(r"\bbascule_[a-z_]+", "\n".join(exprs) + rules_text))
    assert named and named <= exported, sorted(named - exported)
    # the dashboard's queries as recording rules, with Grafana's variables filled in,
    # so that promtool parses each one
    filled = [e.replace("$__rate_interval", "5m").replace("$job", ".*")
              .replace("$instance", ".*") for e in exprs]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{i}", "expr": e} for i, e in enumerate(filled)]}]}
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    checked = promtool("check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_alerts_the_issue_asks_for_exist() -> None:
    alerts = set(re.findall(r"alert: (\w+)", RULES.read_text()))
    assert {"BasculeNoHealthyBackend", "BasculeHighErrorRatio", "BasculeHighLatencyP99",
            "BasculeDiscoveryStale", "BasculeCertificateExpiresSoon",
            "BasculeConfigReloadFailed"} <= alerts
