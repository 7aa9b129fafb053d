"""The Prometheus configuration and alert rules under promtool (Debian's: the checker of our server), and what
every alert must carry for the person it wakes up."""

from __future__ import annotations

import re
import subprocess

import yaml

from .conftest import (
    KUBERNETES_LABELS,
    PROMETHEUS_DIR,
    RULE_TESTS,
    RULES,
    RUNBOOKS,
    SLURM_LABELS,
    alert_rules,
    measured,
    require,
)

SERIES = re.compile(r"^(\w+)\{(.*)\}$")


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [require("promtool"), *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_the_scrape_config_and_the_rules_pass_promtool_check() -> None:
    config = promtool("check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    rules = promtool("check", "rules", str(RULES))
    assert config.returncode == 0, config.stdout + config.stderr
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert "SUCCESS: 21 rules found" in rules.stdout  # 11 alerts, the smoothed loss, 9 GPU-health records


def test_every_alert_fires_in_its_promtool_unit_test_and_stays_quiet_when_healthy() -> None:
    done = promtool("test", "rules", str(RULE_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_unit_tests_cover_every_alert() -> None:
    alerts = {r["alert"] for r in alert_rules() if "alert" in r}
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    tested = {case["alertname"] for test in tests for case in test["alert_rule_test"] if case["exp_alerts"]}
    quiet = {
        case["alertname"] for test in tests for case in test["alert_rule_test"] if not case["exp_alerts"]
    }
    assert tested == quiet == alerts


def test_the_unit_tests_feed_the_rules_the_label_sets_of_real_scrapes() -> None:
    """A rule tested on bare job/stage/rank/node series passed; its label matching failed on real ones."""
    label_sets = set()
    for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for series in test["input_series"]:
            name, labels = SERIES.match(series["series"]).groups()
            names = frozenset(re.findall(r"(\w+)=", labels))
            if name.startswith("svd_"):
                label_sets.add(names)
                assert names in (KUBERNETES_LABELS, SLURM_LABELS), series["series"]
    assert label_sets == {frozenset(KUBERNETES_LABELS), frozenset(SLURM_LABELS)}


def test_every_aggregation_keeps_the_namespace_beside_the_run() -> None:
    for rule in alert_rules():
        for grouping in re.findall(r"\b(?:by|on) \(([^)]*)\)", rule["expr"]):
            labels = {label.strip() for label in grouping.split(",")}
            if "job" in labels:
                assert "namespace" in labels, (rule.get("alert", rule.get("record")), grouping)


def test_every_alert_has_a_description_and_a_runbook_section() -> None:
    headings = {
        re.sub(r"[^a-z0-9-]", "", line.removeprefix("## ").strip().lower().replace(" ", "-"))
        for line in RUNBOOKS.read_text().splitlines()
        if line.startswith("## ")
    }
    for rule in (r for r in alert_rules() if "alert" in r):
        annotations = rule["annotations"]
        assert set(annotations) == {"summary", "description", "runbook_url"}, rule["alert"]
        url, anchor = annotations["runbook_url"].split("#")
        assert url == "https://github.com/svd-project/svd/blob/main/docs/runbooks.md"
        assert anchor == rule["alert"].lower(), rule["alert"]
        assert anchor in headings, rule["alert"]


def test_promtool_test_fails_when_a_threshold_no_longer_matches_its_test(tmp_path) -> None:
    (tmp_path / "svd.rules.yml").write_text(RULES.read_text().replace("> 900", "> 5000"))
    (tmp_path / "svd.rules.test.yml").write_text(RULE_TESTS.read_text())
    done = promtool("test", "rules", str(tmp_path / "svd.rules.test.yml"))
    assert done.returncode == 1
    assert "alertname: SVDTrainingStalled, time: 26m" in done.stdout + done.stderr


def test_measuring_an_alert_makes_its_comparisons_bool_and_leaves_label_matchers_alone() -> None:
    assert measured('up{exporter!="x", a=~"b"} == 0 or x > bool 1') == (
        'up{exporter!="x", a=~"b"} == bool 0 or x > bool 1'
    )
    assert measured("count by (job) (svd_loss != svd_loss)") == "count by (job) (svd_loss != bool svd_loss)"
    assert measured("a >= 2 * b <= 3") == "a >= bool 2 * b <= bool 3"
