"""The Prometheus configuration and alert rules under promtool (Debian's: the checker of our server)."""

from __future__ import annotations

import subprocess

import yaml

from .conftest import PROMETHEUS_DIR, RULES, measured, require


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [require("promtool"), *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_the_scrape_config_and_the_rules_pass_promtool_check() -> None:
    config = promtool("check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    rules = promtool("check", "rules", str(RULES))
    assert config.returncode == 0, config.stdout + config.stderr
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert "SUCCESS: 10 rules found" in rules.stdout  # 9 alerts and the smoothed loss


def test_every_alert_fires_in_its_promtool_unit_test_and_stays_quiet_when_healthy() -> None:
    done = promtool("test", "rules", str(RULES.with_name("svd.rules.test.yml")))
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_unit_tests_cover_every_alert() -> None:

    alerts = {
        r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r
    }
    tests = yaml.safe_load(RULES.with_name("svd.rules.test.yml").read_text())["tests"]
    tested = {case["alertname"] for test in tests for case in test["alert_rule_test"] if case["exp_alerts"]}
    assert tested == alerts


def test_promtool_test_fails_when_a_threshold_no_longer_matches_its_test(tmp_path) -> None:
    (tmp_path / "svd.rules.yml").write_text(RULES.read_text().replace("> 900", "> 5000"))
    (tmp_path / "svd.rules.test.yml").write_text(RULES.with_name("svd.rules.test.yml").read_text())
    done = promtool("test", "rules", str(tmp_path / "svd.rules.test.yml"))
    assert done.returncode == 1
    assert "alertname: SVDTrainingStalled, time: 26m" in done.stdout + done.stderr


def test_measuring_an_alert_makes_its_comparisons_bool_and_leaves_label_matchers_alone() -> None:
    assert measured('up{exporter!="x", a=~"b"} == 0 or x > bool 1') == (
        'up{exporter!="x", a=~"b"} == bool 0 or x > bool 1'
    )
    assert measured("count by (job) (svd_loss != svd_loss)") == "count by (job) (svd_loss != bool svd_loss)"
    assert measured("a >= 2 * b <= 3") == "a >= bool 2 * b <= bool 3"
