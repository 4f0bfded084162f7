"""deploy/grafana's dashboard: it loads, its PromQL parses (promtool), and every metric it names is
one a real server exports after real traffic."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from snapserve.server import RunningServer
from tests.support.calls import digits_input, native_predict, native_stub
from tests.support.models import write_model_version
from tests.support.promtool import promtool
from tests.support.servers import serving

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "snapserve-dashboard.json"
# A metric selector: a name followed by its label matchers (every query here filters by label).
SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{")
LABEL_VALUES = re.compile(r"label_values\(([a-zA-Z_:][a-zA-Z0-9_:]*),")
# What Grafana substitutes before Prometheus sees a query.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$model": ".*", "$job": ".*"}


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def expressions() -> list[str]:
    return [target["expr"] for panel in dashboard()["panels"] for target in panel["targets"]]


def as_prometheus_sees_it(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def test_the_dashboard_has_the_panels_an_on_call_engineer_needs() -> None:
    board = dashboard()
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels), "panel ids are unique"
    for panel in panels:
        assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), panel["title"]
    titles = " | ".join(p["title"].lower() for p in panels)
    for topic in ("throughput", "latency", "queue depth", "batch size", "errors by status code",
                  "disagreement", "memory", "cpu", "refused at load"):
        assert topic in titles, topic
    assert {v["name"] for v in board["templating"]["list"]} == {"datasource", "job", "model"}


def test_every_query_parses_as_promql(tmp_path: Path) -> None:
    tool = promtool()
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{i}", "expr": as_prometheus_sees_it(expr)}
        for i, expr in enumerate(expressions())]}]}
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run([tool, "check", "rules", str(path)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


async def exported_names(running: RunningServer) -> set[str]:
    url = f"http://127.0.0.1:{running.metrics_port}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode())
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


async def test_every_metric_it_names_is_exported(model_repo: Path) -> None:
    # digits/2 is refused at load, so the load-failure counter has a series too.
    write_model_version(model_repo, "digits", [], (1, 4, 4), [str(i) for i in range(5)],
                        manifest_overrides={"members": []})
    async with serving(model_repo, metrics_port=0) as running:
        async with native_stub(running) as stub:
            await native_predict(stub, digits_input(2))
            with pytest.raises(grpc.aio.AioRpcError):  # a refusal: the requests' code series
                await native_predict(stub, digits_input(1), model="made-up")
        exported = await exported_names(running)
    named = {name for expr in expressions() for name in SELECTOR.findall(expr)}
    named |= {name for v in dashboard()["templating"]["list"]
              for name in LABEL_VALUES.findall(v.get("query", ""))}
    assert named, "the dashboard names no metric"
    assert named <= exported, f"not exported by the server: {sorted(named - exported)}"
