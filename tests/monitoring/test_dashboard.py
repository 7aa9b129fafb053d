"""The Grafana dashboard (JSON kept in the repo, as Grafana exports it) against a schema of the parts of
Grafana's dashboard model it uses, and for what a schema cannot say: layout, variables, metric names.
Its PromQL is run against a real Prometheus in test_scrape.py."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import jsonschema
import pytest

from svd.eval.watch import EvalGauges
from svd.train.metrics import MetricsConfig, TrainMetrics

from .conftest import DASHBOARD, RULES, alert_rules, graph_panels

SCHEMA = Path(__file__).with_name("grafana-dashboard.schema.json")
GRAFANA_VARIABLES = {"__rate_interval", "__interval", "__range"}
PANELS = (  # what the dashboard must show
    "Loss",
    "Samples / s",
    "MFU",
    "Step time breakdown",
    "Data wait share",
    "Skipped samples",
    "Checkpoint save time",
    "Peak memory per rank",
    "Rank liveness",
    "Evaluation metrics by checkpoint",
)
GPU_PANELS = {  # the GPU health row: dcgm-exporter's series of the run's pods (recorded in svd.rules.yml)
    "GPU utilisation and SM activity": {"svd:gpu_utilization:ratio", "svd:gpu_sm_active:ratio"},
    "GPU memory used": {"svd:gpu_memory_used:bytes", "svd:gpu_memory_free:bytes"},
    "GPU power": {"svd:gpu_power:watts"},
    "GPU temperature": {"svd:gpu_temperature:celsius"},
    "GPU throttle reasons": {"svd:gpu_clock_event_reasons:bitmask"},
    "GPU XID errors": {"svd:gpu_last_xid:code"},
}
VARIABLES = ["datasource", "namespace", "job", "stage", "rank", "node"]


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def exported_names() -> set[str]:
    """Every sample name TrainMetrics exports, observed once with everything switched on, and the evaluation
    watch's gauge."""
    metrics = TrainMetrics(
        MetricsConfig(port=0, gpu="H100"), job="j", stage="s", rank=0, node="n", flops_per_sample=1e9
    )
    metrics.observe_start(world_size=1, checkpoint_every=10, checkpoint_step=None)
    metrics.observe_step(1, 0.5, 1.0, 1e-4, 1.0, 0.1, 2)
    metrics.observe_skipped({"corrupt": 1})
    metrics.observe_checkpoint(1.0)
    metrics.observe_checkpoint_committed(1)
    gauges = EvalGauges("j", "s")
    gauges.observe({"protocol": "motion_adherence", "step": 1, "values": {"spearman_rho": 0.5}})
    registries = (metrics.registry, gauges.registry)
    return {sample.name for r in registries for family in r.collect() for sample in family.samples}


def test_the_dashboard_matches_the_schema(dashboard: dict) -> None:
    jsonschema.validate(dashboard, json.loads(SCHEMA.read_text()))


def test_the_schema_rejects_a_panel_without_a_query_and_a_foreign_datasource(dashboard: dict) -> None:
    schema = json.loads(SCHEMA.read_text())
    broken = json.loads(json.dumps(dashboard))
    broken["panels"][0]["targets"][0].pop("expr")
    with pytest.raises(jsonschema.ValidationError, match="'expr' is a required property"):
        jsonschema.validate(broken, schema)
    broken = json.loads(json.dumps(dashboard))
    broken["panels"][1]["datasource"]["uid"] = "my-prometheus"
    with pytest.raises(jsonschema.ValidationError, match="was expected"):
        jsonschema.validate(broken, schema)


def test_it_shows_every_required_panel_on_a_grid_without_overlaps(dashboard: dict) -> None:
    panels = dashboard["panels"]
    assert set(PANELS) | set(GPU_PANELS) <= {p["title"] for p in panels}
    assert len({p["id"] for p in panels}) == len(panels)
    cells = {}
    for panel in panels:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        for cell in itertools.product(range(g["x"], g["x"] + g["w"]), range(g["y"], g["y"] + g["h"])):
            assert cell not in cells, f"{panel['title']} overlaps {cells[cell]}"
            cells[cell] = panel["title"]
    for panel in graph_panels(dashboard):
        refs = [t["refId"] for t in panel["targets"]]
        assert len(set(refs)) == len(refs), panel["title"]


def test_the_gpu_row_follows_the_training_panels_and_reads_the_recorded_join(dashboard: dict) -> None:
    (row,) = [p for p in dashboard["panels"] if p["type"] == "row"]
    below = [p for p in dashboard["panels"] if p["gridPos"]["y"] > row["gridPos"]["y"]]
    assert {p["title"] for p in below} == set(GPU_PANELS)
    recorded = {r["record"] for r in alert_rules() if "record" in r}
    for panel in below:
        used = {name for t in panel["targets"] for name in re.findall(r"svd:gpu_\w+:\w+", t["expr"])}
        assert used == GPU_PANELS[panel["title"]], panel["title"]
        assert used <= recorded


def test_every_query_filters_by_the_run_and_uses_only_defined_variables(dashboard: dict) -> None:
    assert [v["name"] for v in dashboard["templating"]["list"]] == VARIABLES
    defined = set(VARIABLES) | GRAFANA_VARIABLES
    exprs = [t["expr"] for p in graph_panels(dashboard) for t in p["targets"]]
    variables = [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    used = {name for expr in exprs + variables for name in re.findall(r"\$\{?(\w+)", expr)}
    assert used <= defined
    assert all('namespace=~"$namespace", job=~"$job"' in expr for expr in exprs)


def test_every_svd_metric_in_the_dashboard_and_the_rules_is_one_the_trainer_exports(dashboard: dict) -> None:
    exprs = [t["expr"] for p in graph_panels(dashboard) for t in p["targets"]] + [RULES.read_text()]
    referenced = {name for expr in exprs for name in re.findall(r"\bsvd_[a-z_]+", expr)}
    exported = exported_names()
    assert referenced - exported == set()
    assert {"svd_step_timestamp_seconds", "svd_world_size", "svd_checkpoint_failures_total"} <= referenced
    assert "svd_mfu_ratio" in exported  # a ratio ends in _ratio (Prometheus naming)
