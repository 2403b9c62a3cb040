"""The dashboards against a real Prometheus scraping a real soak run.

Every query of both dashboards is checked for syntax by promtool (as recording rules) and
must return data through the Prometheus HTTP API while the soak runs. The soak's size is
set by TDW_SOAK_DEVICES / TDW_SOAK_DURATION, so the same test is the acceptance run
(20 devices, 300 s) when asked.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, free_port, require_tool, start_cli_process

GRAFANA = REPO / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
# Scrape as grafana/prometheus.yml does: a loaded soak process may need seconds to answer,
# and a scrape that times out marks every series stale.
SCRAPE = "5s"
# What Grafana would put in for its variables; $__rate_interval is at least 4 scrapes.
SUBSTITUTIONS = {"$__rate_interval": "30s", "$job": "tdw-soak", "$device": ".+"}


def panel_queries(path: Path) -> list[tuple[str, str]]:
    board = json.loads(path.read_text())
    return [
        (f"{board['uid']}/{panel['title']}/{target['refId']}", target["expr"])
        for panel in board["panels"]
        for target in panel["targets"]
    ]


def grafana_expr(expr: str) -> str:
    for variable, value in SUBSTITUTIONS.items():
        expr = expr.replace(variable, value)
    return expr


def test_the_device_dashboards_all_is_the_devices_only():
    """'All' on the device dashboard must not sum the TMS's and the Archive's series into
    device panels: the variable lists device AEs only, and without an allValue Grafana
    matches exactly the listed ones (an allValue of .+ matched every AE)."""
    board = json.loads((GRAFANA / "dashboards" / "tdw-device.json").read_text())
    device = next(v for v in board["templating"]["list"] if v["name"] == "device")
    assert device["includeAll"] and "allValue" not in device
    assert 'kind=~"pds|pps|tdd|afterloader"' in device["definition"]


def test_dashboards_are_provisionable_as_they_are():
    uids = set()
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        assert "__inputs" not in board and "id" not in board, path.name
        uids.add(board["uid"])
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        for panel in board["panels"]:
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == "${datasource}"
    assert uids == {"tdw-soak", "tdw-device"}
    soak_titles = {
        p["title"] for p in json.loads((GRAFANA / "dashboards/tdw-soak.json").read_text())["panels"]
    }
    for wanted in (
        "Sessions per minute",
        "Session outcomes",
        "DIMSE latency p50 by operation (devices)",
        "DIMSE latency p99 by operation (devices)",
        "Error statuses",
        "Interlocks and faults",
        "Results backlog",
        "Devices connected",
        "Process memory",
    ):
        assert wanted in soak_titles
    for provisioning in (GRAFANA / "provisioning").rglob("*.yaml"):
        assert yaml.safe_load(provisioning.read_text())["apiVersion"] == 1


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def _query(base: str, expr: str) -> dict:
    return _get(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))


@pytest.fixture
def prometheus_tools():
    return require_tool("/usr/bin/prometheus"), require_tool("/usr/bin/promtool")


def test_every_dashboard_query_is_valid_and_has_data_from_a_real_soak(tmp_path, prometheus_tools):
    prometheus, promtool = prometheus_tools
    devices = int(os.environ.get("TDW_SOAK_DEVICES", "4"))
    duration = float(os.environ.get("TDW_SOAK_DURATION", "55"))

    check = subprocess.run(
        [promtool, "check", "config", str(GRAFANA / "prometheus.yml")],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    queries = [q for path in DASHBOARDS for q in panel_queries(path)]
    rules = {
        "groups": [
            {
                "name": "dashboard-queries",
                "rules": [
                    {"record": f"tdw_dashboard:query_{i}", "expr": grafana_expr(expr)}
                    for i, (_, expr) in enumerate(queries)
                ],
            }
        ]
    }
    rules_file = tmp_path / "dashboard-rules.yml"
    rules_file.write_text(yaml.safe_dump(rules))
    check = subprocess.run(
        [promtool, "check", "rules", str(rules_file)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr

    verdict_file = tmp_path / "verdict.json"
    soak = start_cli_process(
        "soak",
        "--embedded",
        "--devices",
        str(devices),
        "--mix",
        "pds=1,pps+tdd=2,afterloader=1",
        "--duration",
        str(duration),
        "--fault-rate",
        "0.15",
        "--workers",
        "2",
        "--metrics-port",
        "0",
        "--json",
        str(verdict_file),
        "--metrics-targets",
        str(tmp_path / "targets.json"),
        ready="prometheus targets in",
    )
    started = time.monotonic()
    prometheus_process = None
    try:
        # The TMS process and each worker serve their own /metrics; the soak lists them all
        # for Prometheus's file-based discovery, as grafana/prometheus.yml reads it.
        targets = json.loads((tmp_path / "targets.json").read_text())[0]["targets"]
        assert len(targets) == 3  # the TMS and 2 workers
        config = tmp_path / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {
                        "scrape_interval": SCRAPE,
                        "scrape_timeout": SCRAPE,
                        "evaluation_interval": SCRAPE,
                    },
                    "scrape_configs": [
                        {
                            "job_name": "tdw-soak",
                            "file_sd_configs": [{"files": [str(tmp_path / "targets.json")]}],
                        }
                    ],
                }
            )
        )
        port = free_port()
        prometheus_process = subprocess.Popen(
            [
                prometheus,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if urllib.request.urlopen(f"{base}/-/ready", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        # Query near the end of the run, when every counter has moved and rate() has points.
        time.sleep(max(max(40.0, duration - 12.0) - (time.monotonic() - started), 0))
        assert soak.process.poll() is None, "\n".join(soak.output)
        up = _query(base, 'min_over_time(up{job="tdw-soak"}[1m])')["data"]["result"]
        assert len(up) == 3 and all(float(r["value"][1]) == 1 for r in up), up
        took = _query(base, 'max_over_time(scrape_duration_seconds{job="tdw-soak"}[5m])')
        print(f"slowest scrape {float(took['data']['result'][0]['value'][1]):.3f} s")
        empty = []
        for name, expr in queries:
            answer = _query(base, grafana_expr(expr))
            assert answer["status"] == "success", (name, answer)
            if not answer["data"]["result"]:
                empty.append(name)
        assert empty == [], f"queries without data: {empty}"
        jobs = _get(f"{base}/api/v1/label/job/values?match[]=tdw_build_info")["data"]
        assert jobs == ["tdw-soak"]
        aes = _get(
            f"{base}/api/v1/label/ae/values?"
            + urllib.parse.urlencode({"match[]": 'tdw_actor_info{kind=~"pds|pps|tdd|afterloader"}'})
        )["data"]
        assert len(aes) == devices
        completed = _query(base, 'sum(tdw_sessions_total{outcome="completed"})')
        assert float(completed["data"]["result"][0]["value"][1]) > 0
        connected = _query(base, "sum(tdw_device_connected)")
        assert float(connected["data"]["result"][0]["value"][1]) == devices
        soak.process.wait(timeout=duration + 240)
    finally:
        if prometheus_process is not None:
            prometheus_process.terminate()
            prometheus_process.wait(timeout=20)
        soak.stop()
    assert soak.process.returncode == 0, "\n".join(soak.output[-40:])
    verdict = json.loads(verdict_file.read_text())
    assert verdict["ok"] and verdict["records"]["lost_records"] == 0
