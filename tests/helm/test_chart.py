"""The chart, rendered by Helm's template engine for several value sets: every manifest valid for Kubernetes
1.30 or its CRD, the entrypoint a command the project's CLIs accept, wrong values refused with a message."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from .conftest import CHART, ROOT, TABLE, example, render, validate

RAY_LAUNCHER = ROOT / "svd" / "launch" / "ray.py"
VALUE_SETS = {
    "defaults": TABLE,
    "32 nodes": example("video-pretrain-32-nodes.yaml"),
    "curation on CPU": example("curate-cpu.yaml"),
    "no monitoring, no secret": TABLE
    | {
        "metrics": {
            "podMonitor": {"enabled": False},
            "prometheusRule": {"enabled": False},
            "grafanaDashboard": {"enabled": False},
        }
    },
}


def pods(rayjob: dict) -> dict[str, dict]:
    """The pod templates of a RayJob: submitter, head, workers."""
    cluster = rayjob["spec"]["rayClusterSpec"]
    return {
        "submitter": rayjob["spec"]["submitterPodTemplate"],
        "head": cluster["headGroupSpec"]["template"],
        **{group["groupName"]: group["template"] for group in cluster["workerGroupSpecs"]},
    }


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_every_manifest_is_valid_for_kubernetes_or_its_crd_and_every_pod_runs_unprivileged(
    chart, crd_schemas, values
) -> None:
    rendered = render(chart, values)
    manifests = [doc for key, docs in rendered.items() if key != "svd/templates/NOTES.txt" for doc in docs]
    for manifest in manifests:
        validate(manifest, crd_schemas)
    (rayjob,) = [m for m in manifests if m["kind"] == "RayJob"]
    for role, template in pods(rayjob).items():
        # a pod template checked as Kubernetes checks a built-in PodTemplate (stricter than the CRD)
        kubernetes_validate.validate(
            {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": role}, "template": template},
            "1.30.0",
            strict=True,
        )
        spec = template["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        for container in spec["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
            secrets = [
                e for e in container.get("env", []) if e["name"].startswith("AWS_") and "KEY" in e["name"]
            ]
            assert all("value" not in e and "secretKeyRef" in e["valueFrom"] for e in secrets)


def test_a_32_node_training_run_has_32_gpu_workers_with_shared_memory_cache_and_metrics(chart) -> None:
    rendered = render(chart, example("video-pretrain-32-nodes.yaml"))
    assert {k: [d["kind"] for d in v] for k, v in rendered.items() if not k.endswith("NOTES.txt")} == {
        "configmap.yaml": ["ConfigMap"],
        "dashboard.yaml": ["ConfigMap"],
        "podmonitor.yaml": ["PodMonitor"],
        "prometheusrule.yaml": ["PrometheusRule"],
        "rayjob.yaml": ["RayJob"],
    }
    rayjob = rendered["rayjob.yaml"][0]
    assert rayjob["spec"]["entrypoint"] == (
        "python jobs/launch.py launcher=ray stage=video_pretrain model=svd cluster=release "
        "nodes=32 gpus_per_node=8"
    )
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True
    assert (rayjob["spec"]["ttlSecondsAfterFinished"], rayjob["spec"]["backoffLimit"]) == (3600, 1)
    (group,) = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (32, 32, 32)
    worker = group["template"]["spec"]
    (container,) = worker["containers"]
    assert container["image"] == "registry.example.com/ml/svd:0.1.0"
    assert container["resources"]["limits"] == {"cpu": "96", "memory": "1000Gi", "nvidia.com/gpu": 8}
    assert container["ports"] == [{"name": "metrics", "containerPort": 9400}]
    assert worker["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert worker["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    volumes = {v["name"]: v for v in worker["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "128Gi"}
    assert "ephemeral" in volumes["cache"]
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    head_volumes = {v["name"]: v for v in head["volumes"]}
    assert head_volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "4Gi"}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert (mounts["dshm"], mounts["cache"], mounts["tmp"]) == ("/dev/shm", "/cache", "/tmp")
    env = {e["name"]: e for e in container["env"]}
    assert env["AWS_ENDPOINT_URL"]["value"] == "https://s3.example.com"
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "svd-s3-credentials",
        "key": "AWS_SECRET_ACCESS_KEY",
    }
    monitor = rendered["podmonitor.yaml"][0]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= group["template"]["metadata"]["labels"].items()
    )
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["podMetricsEndpoints"][0]["honorLabels"] is True
    # the same `exporter` label as the Slurm scrape config: the SVDMetricsEndpointDown alert selects on it
    (slurm,) = yaml.safe_load((ROOT / "infra/prometheus/prometheus.yml").read_text())["scrape_configs"]
    assert slurm["honor_labels"] is True
    assert monitor["spec"]["podMetricsEndpoints"][0]["relabelings"] == [
        {
            "action": "replace",
            "targetLabel": "exporter",
            "replacement": slurm["relabel_configs"][0]["replacement"],
        }
    ]
    notes = rendered["svd/templates/NOTES.txt"]
    assert "kubectl -n ml logs -f job/vpt" in notes
    assert "32 nodes × 8 GPUs" in notes


def test_the_rules_and_the_dashboard_are_the_files_of_infra(chart) -> None:
    rendered = render(chart, TABLE)
    rule = rendered["prometheusrule.yaml"][0]
    assert rule["spec"] == yaml.safe_load((ROOT / "infra/prometheus/rules/svd.rules.yml").read_text())
    dashboard = rendered["dashboard.yaml"][0]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    text = (ROOT / "infra/grafana/svd-training.json").read_text()
    assert json.loads(dashboard["data"]["svd-training.json"]) == json.loads(text)


def test_switched_off_monitoring_and_curation_render_only_what_they_need(chart) -> None:
    assert set(render(chart, VALUE_SETS["no monitoring, no secret"])) == {
        "configmap.yaml",
        "rayjob.yaml",
        "svd/templates/NOTES.txt",
    }
    curate = render(chart, example("curate-cpu.yaml"))
    assert set(curate) == {"rayjob.yaml", "svd/templates/NOTES.txt"}
    (group,) = curate["rayjob.yaml"][0]["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert (group["groupName"], group["replicas"]) == ("cpu-workers", 16)
    (container,) = group["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert "ports" not in container


def app_layout(rendered: dict, tmp_path: Path) -> tuple[Path, list[str]]:
    """The image's /app (infra/docker/Dockerfile: the repository's svd/ and jobs/) with the run's ConfigMap
    mounted where the head's volumeMount puts it; returns /app and the entrypoint's arguments."""
    assert "WORKDIR /app" in (ROOT / "infra/docker/Dockerfile").read_text()
    rayjob, configmap = rendered["rayjob.yaml"][0], rendered["configmap.yaml"][0]
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    (mount,) = [m for m in head["volumeMounts"] if m["name"] == "run-config"]
    app = tmp_path / "app"
    for part in ("svd", "jobs"):
        shutil.copytree(ROOT / part, app / part, ignore=shutil.ignore_patterns("__pycache__"))
    (app / Path(mount["mountPath"]).relative_to("/app")).write_text(configmap["data"][mount["subPath"]])
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:2] == ["python", "jobs/launch.py"]
    return app, argv[1:]


def run_in(app: Path, argv: list[str]) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(app)}
    return subprocess.run(
        [sys.executable, *argv], cwd=app, env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_the_training_entrypoint_composes_the_run_from_values_and_configmap(chart, tmp_path) -> None:
    app, argv = app_layout(render(chart, example("video-pretrain-32-nodes.yaml")), tmp_path)
    done = run_in(app, [*argv, "--cfg"])
    assert done.returncode == 0, done.stderr
    cfg = yaml.safe_load(done.stdout)
    assert (cfg["nodes"], cfg["gpus_per_node"], cfg["job_name"]) == (32, 8, "vpt")
    assert (cfg["launcher"]["name"], cfg["stage"]["name"], cfg["model"]["preset"]) == (
        "ray",
        "video_pretrain",
        "svd",
    )
    assert cfg["data"]["table"] == "s3://lvd/lvd_f/clips.lance"
    assert cfg["data"]["num_workers"] == 8
    assert cfg["metrics"] == cfg["metrics"] | {"port": 9400, "gpu": "H100"}
    assert cfg["checkpoint"]["run_dir"] == "s3://lvd/runs/vpt"
    assert (cfg["cluster"]["name"], cfg["cluster"]["gpus"]) == ("release", True)


@pytest.mark.skipif(not RAY_LAUNCHER.exists(), reason="svd/launch/ray.py (the Ray launcher) is not here yet")
def test_the_training_entrypoint_passes_the_ray_launchers_dry_run(chart, tmp_path) -> None:
    app, argv = app_layout(render(chart, example("video-pretrain-32-nodes.yaml")), tmp_path)
    done = run_in(app, [*argv, "--dry-run"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("launcher=ray: 256 rank(s) = nodes 32 × 8; stage video_pretrain")


def test_the_curation_entrypoint_parses_with_curate_py(chart) -> None:
    rayjob = render(chart, example("curate-cpu.yaml"))["rayjob.yaml"][0]
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:2] == ["python", "jobs/curate.py"]
    spec = importlib.util.spec_from_file_location("curate_cli", ROOT / "jobs" / "curate.py")
    curate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(curate)
    cfg = curate.parse(argv[2:])
    assert (cfg.launcher, cfg.shards, cfg.input, cfg.output) == (
        "ray",
        64,
        "s3://lvd/raw/",
        "s3://lvd/lvd/clips.lance",
    )
    assert (cfg.workers, cfg.min_clip_s) == (8, 2.0)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (TABLE | {"job": "serve"}, "at '/job': value must be one of 'train', 'curate'"),
        ({"job": "train"}, "at '/train/config': missing property 'data'"),
        (TABLE | {"train": TABLE["train"] | {"nodes": 0}}, "at '/train/nodes': minimum: got 0, want 1"),
        (TABLE | {"workers": {"gpus": 0}}, "at '/workers/gpus': minimum: got 0, want 1"),
        (TABLE | {"workers": {"gpu": 8}}, "at '/workers': additional properties 'gpu' not allowed"),
        (TABLE | {"podSecurityContext": {"runAsNonRoot": False}}, "at '/podSecurityContext/runAsNonRoot'"),
        (
            TABLE | {"s3": {"accessKeyId": "AKIA…"}},
            "at '/s3': additional properties 'accessKeyId' not allowed",
        ),
        (
            {"job": "curate", "curate": {"input": "s3://raw/a b", "output": "s3://t/clips.lance"}},
            "at '/curate/input': 's3://raw/a b' does not match pattern",
        ),
        (TABLE | {"train": TABLE["train"] | {"config": {"nodes": 4}}}, "at '/train/config/nodes'"),
    ],
    ids=["job", "table", "nodes", "gpus", "typo", "root", "literal key", "shell", "nodes in config"],
)
def test_wrong_values_fail_at_render_with_the_value_named(chart, values, message) -> None:
    with pytest.raises(helm.HelmValuesError) as raised:
        chart.render(values, name="vpt", namespace="ml")
    assert message in str(raised.value)


def test_helm_lint_passes_strictly_for_kubernetes_1_30(chart) -> None:
    for values in VALUE_SETS.values():
        report = helm.lint(CHART, values, strict=True, kube_version="v1.30.0")
        assert report["errors"] == []
        assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_a_misspelt_crd_field_and_a_kind_without_a_schema_are_failures(chart, crd_schemas) -> None:
    rayjob = render(chart, TABLE)["rayjob.yaml"][0]
    rayjob["spec"]["shutdownAfterJobFinish"] = rayjob["spec"].pop("shutdownAfterJobFinishes")
    with pytest.raises(jsonschema.ValidationError, match="shutdownAfterJobFinish"):
        validate(rayjob, crd_schemas)
    unknown = {"apiVersion": "ray.io/v1", "kind": "RayService", "metadata": {"name": "x"}, "spec": {}}
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        validate(unknown, crd_schemas)


def test_the_image_is_pinned_non_root_and_runs_the_ray_the_chart_declares() -> None:
    dockerfile = (ROOT / "infra/docker/Dockerfile").read_text()
    constraints = (ROOT / "infra/docker/constraints.txt").read_text().splitlines()
    (base,) = [line.split()[1] for line in dockerfile.splitlines() if line.startswith("FROM ")]
    assert base.count(".") >= 2  # an exact Python release, not a moving tag
    assert "USER 1000:1000" in dockerfile
    assert "--constraint infra/docker/constraints.txt" in dockerfile
    ray_version = yaml.safe_load((CHART / "values.yaml").read_text())["rayVersion"]
    assert f"ray=={ray_version}" in constraints
    assert "torch==2.13.0" in constraints
