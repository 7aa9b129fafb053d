"""A real Prometheus (Debian's) on 127.0.0.1, configured from infra/prometheus/ with the alert rules loaded,
scraping whatever target files a test writes; and PromQL helpers shared by the monitoring tests."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from svd.data.local_s3 import free_port

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "infra" / "prometheus"
RULES = PROMETHEUS_DIR / "rules" / "svd.rules.yml"
RULE_TESTS = RULES.with_name("svd.rules.test.yml")
DASHBOARD = ROOT / "infra" / "grafana" / "svd-training.json"
RUNBOOKS = ROOT / "docs" / "runbooks.md"
# The label names of a trainer's series as Prometheus stores them: the trainer's own, and what the scrape adds
# (the PodMonitor on Kubernetes, file_sd on Slurm). test_scrape.py checks the Kubernetes set on a real scrape
# (file_sd with the PodMonitor's target labels); the promtool tests use exactly these sets.
TRAINER_LABELS = {"job", "stage", "rank", "node"}
KUBERNETES_LABELS = TRAINER_LABELS | {"exporter", "instance", "namespace", "pod", "container", "endpoint"}
SLURM_LABELS = TRAINER_LABELS | {"exporter", "instance", "slurm_job_id"}


def require(tool: str) -> str:
    """The tool's path; a test without it is skipped here, and fails in CI (.ci/run installs it)."""
    path = shutil.which(tool)
    if path is None:
        message = f"{tool} is not installed (infra/prometheus/install.sh installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


class QueryError(RuntimeError):
    pass


@dataclass(frozen=True)
class Prometheus:
    url: str
    targets_dir: Path  # svd's endpoints, scraped as infra/prometheus/prometheus.yml says
    # Targets scraped as on Kubernetes, without honoured labels: Ray's port by the PodMonitor's second
    # endpoint, dcgm-exporter by its chart's ServiceMonitor (its `pod` becomes `exported_pod`).
    ray_targets_dir: Path
    dcgm_targets_dir: Path

    def query(self, expr: str) -> list[dict]:
        """The instant vector of `expr` now; a PromQL error raises QueryError with Prometheus' message."""
        address = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
        try:
            with urllib.request.urlopen(address, timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as e:  # 400/422: the expression is wrong
            body = json.load(e)
        if body["status"] != "success":
            raise QueryError(f"{expr}: {body['errorType']}: {body['error']}")
        if body["data"]["resultType"] != "vector":
            raise QueryError(f"{expr}: a {body['data']['resultType']}, not an instant vector")
        return body["data"]["result"]


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """infra/prometheus/prometheus.yml at test pace (1 s scrapes and rule evaluations), reading target files
    from a fresh folder instead of outputs/, plus two scrape jobs as the Prometheus operator configures them
    (no honoured labels) for Ray's and dcgm-exporter's endpoints; stopped after the module."""
    binary = require("prometheus")
    folder = tmp_path_factory.mktemp("prometheus")
    targets = folder / "targets"
    for sub in (targets, targets / "ray", targets / "dcgm"):
        sub.mkdir()
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"}
    config["rule_files"] = [str(RULES)]
    for job in config["scrape_configs"]:
        for sd in job["file_sd_configs"]:
            sd["files"] = [str(targets / "*.json")]
    config["scrape_configs"] += [
        {
            "job_name": name,
            "honor_labels": False,
            "file_sd_configs": [{"files": [str(targets / name / "*.json")]}],
        }
        for name in ("ray", "dcgm")
    ]
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (folder / "prometheus.log").open("w")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _ready(url), 30, f"Prometheus on {url} (log: {folder / 'prometheus.log'})")
        yield Prometheus(url, targets, targets / "ray", targets / "dcgm")
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
        log.close()


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def wait_until(condition, timeout_s: float, what: str) -> None:
    """Poll `condition()` every 0.5 s; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f} s for {what}")
        time.sleep(0.5)


def graph_panels(dashboard: dict) -> list[dict]:
    """The panels that query (rows only group them)."""
    return [panel for panel in dashboard["panels"] if panel["type"] != "row"]


def dashboard_queries(dashboard: dict, job: str, stage: str) -> dict[str, str]:
    """Each panel target's PromQL as Prometheus would receive it from Grafana: the run and stage chosen, the
    other variables on "All" (their allValue `.*`), `$__rate_interval` a window that spans several scrapes,
    `$__range` the dashboard's hour.
    Keyed by `panel title / refId`."""
    values = {f"${v['name']}": v["allValue"] for v in dashboard["templating"]["list"] if "allValue" in v}
    values |= {"$__rate_interval": "1m", "$__range": "1h", "$job": job, "$stage": stage}
    pattern = re.compile("|".join(re.escape(k) for k in sorted(values, key=len, reverse=True)))
    return {
        f"{panel['title']} / {target['refId']}": pattern.sub(lambda m: values[m[0]], target["expr"])
        for panel in graph_panels(dashboard)
        for target in panel["targets"]
    }


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


COMPARISON = re.compile(r"(==|!=|>=|<=|>|<)(?!\s*bool\b)")


def measured(expr: str) -> str:
    """`expr` with every comparison made `bool`: instead of keeping only the series past a threshold, it
    returns each series' 0/1 outcome, so a healthy run still shows whether the selectors, label matching
    and aggregations of an alert find its series. Label matchers (`{…}`) and strings are left alone."""
    out, depth, quote = [], 0, None
    i = 0
    while i < len(expr):
        c = expr[i]
        if quote:
            quote = None if c == quote else quote
        elif c in "\"'":
            quote = c
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
        elif depth == 0 and (m := COMPARISON.match(expr, i)):
            out.append(f"{m[1]} bool")
            i = m.end()
            continue
        out.append(c)
        i += 1
    return "".join(out)
