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

from svd.config import METRICS_PORT

from .conftest import CHART, MONITORING_CHART, ROOT, TABLE, example, manifests, render, validate

RAY_LAUNCHER = ROOT / "svd" / "launch" / "ray.py"
VALUE_SETS = {
    "defaults": TABLE,
    "32 nodes, Kueue": example("video-pretrain-32-nodes.yaml"),
    "4 nodes, Volcano": example("video-pretrain-volcano.yaml"),
    "curation on CPU": example("curate-cpu.yaml"),
    "evaluation watch": example("evaluate-watch.yaml"),
    "no monitoring, no secret": TABLE | {"metrics": {"podMonitor": {"enabled": False}}},
}


def pods(rayjob: dict) -> dict[str, dict]:
    """The pod templates of a RayJob: submitter, head, workers."""
    cluster = rayjob["spec"]["rayClusterSpec"]
    return {
        "submitter": rayjob["spec"]["submitterPodTemplate"],
        "head": cluster["headGroupSpec"]["template"],
        **{group["groupName"]: group["template"] for group in cluster["workerGroupSpecs"]},
    }


def the(rendered: dict, kind: str) -> dict:
    (manifest,) = [m for m in manifests(rendered) if m["kind"] == kind]
    return manifest


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_every_manifest_is_valid_for_kubernetes_or_its_crd_and_every_pod_runs_unprivileged(
    chart, crd_schemas, values
) -> None:
    rendered = render(chart, values)
    for manifest in manifests(rendered):
        validate(manifest, crd_schemas)
    for role, template in pods(the(rendered, "RayJob")).items():
        # a pod template checked as Kubernetes checks a built-in PodTemplate (stricter than the CRD)
        kubernetes_validate.validate(
            {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": role}, "template": template},
            "1.30.0",
            strict=True,
        )
        spec = template["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["readOnlyRootFilesystem"] is True
            assert context["capabilities"]["drop"] == ["ALL"]
            assert context["capabilities"].get("add", []) in ([], ["IPC_LOCK"])  # workers.ipcLock, RDMA
            secrets = [
                e for e in container.get("env", []) if e["name"].startswith("AWS_") and "KEY" in e["name"]
            ]
            assert all("value" not in e and "secretKeyRef" in e["valueFrom"] for e in secrets)


def test_the_32_node_example_lands_its_queue_priority_rdma_nccl_and_volumes_where_they_are_read(
    chart,
) -> None:
    """Kueue reads the queue from the RayJob's labels; the scheduler the pods' priorityClassName; the kubelet
    the worker's resources, environment, capabilities and volumes. The head gets none of the workers' volumes
    (a 1 TiB local-NVMe claim on the CPU head pod kept it Pending)."""
    values = example("video-pretrain-32-nodes.yaml")
    rendered = render(chart, values)
    assert {k: [d["kind"] for d in v] for k, v in rendered.items() if k != "NOTES.txt"} == {
        "configmap.yaml": ["ConfigMap"],
        "podmonitor.yaml": ["PodMonitor"],
        "rayjob.yaml": ["RayJob"],
    }
    rayjob = the(rendered, "RayJob")
    assert rayjob["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "training"
    assert rayjob["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "training-high"
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True  # Kueue admits no RayJob that keeps its cluster
    for manifest in manifests(rendered):  # labels on every object the chart makes
        assert manifest["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "training", manifest["kind"]
    assert rayjob["spec"]["entrypoint"] == (
        "python jobs/launch.py launcher=ray stage=video_pretrain model=svd cluster=release "
        "nodes=32 gpus_per_node=8"
    )
    (group,) = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (32, 32, 32)
    templates = pods(rayjob)
    for role, template in templates.items():
        assert template["metadata"]["annotations"] == {"karpenter.sh/do-not-disrupt": "true"}, role
        assert "kueue.x-k8s.io/queue-name" not in template["metadata"]["labels"], (
            role
        )  # pods: no queue of their own
        assert template["spec"]["priorityClassName"] == "training-high", role
    worker = group["template"]["spec"]
    (container,) = worker["containers"]
    assert container["image"] == "registry.example.com/ml/svd:0.1.0"
    resources = {"cpu": "96", "memory": "1000Gi", "nvidia.com/gpu": 8, "rdma/ib": 1}
    assert container["resources"] == {"requests": resources, "limits": resources}
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
    env = {e["name"]: e for e in container["env"]}
    assert {name: env[name]["value"] for name in env if name.startswith("NCCL_")} == {
        "NCCL_IB_HCA": "mlx5",
        "NCCL_SOCKET_IFNAME": "eth0",
        "NCCL_DEBUG": "WARN",
    }
    assert env["HF_HOME"]["value"] == "/cache/huggingface"
    assert env["AWS_ENDPOINT_URL"]["value"] == "https://s3.example.com"
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "svd-s3-credentials",
        "key": "AWS_SECRET_ACCESS_KEY",
    }
    assert worker["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert worker["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    volumes = {v["name"]: v for v in worker["volumes"]}
    assert set(volumes) == {"tmp", "dshm", "run-config", "cache", "weights"}
    assert "ephemeral" in volumes["cache"]
    assert volumes["weights"]["persistentVolumeClaim"] == {"claimName": "svd-weights", "readOnly": True}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {
        "tmp": "/tmp",
        "dshm": "/dev/shm",
        "run-config": "/app/jobs/conf/cluster/release.yaml",
        "cache": "/cache",
        "weights": "/weights",
    }
    head = templates["head"]["spec"]
    assert {v["name"] for v in head["volumes"]} == {"tmp", "dshm", "run-config"}
    assert {m["name"] for m in head["containers"][0]["volumeMounts"]} == {"tmp", "dshm", "run-config"}
    assert "HF_HOME" not in {e["name"] for e in head["containers"][0]["env"]}
    assert "NCCL_IB_HCA" in {e["name"] for e in head["containers"][0]["env"]}  # extraEnv: every Ray container
    notes = rendered["NOTES.txt"]
    assert "kubectl -n ml logs -f job/vpt" in notes
    assert "32 nodes × 8 GPUs" in notes


def test_the_volcano_example_names_its_queue_on_the_rayjob_and_its_network_on_the_pods(chart) -> None:
    rendered = render(chart, example("video-pretrain-volcano.yaml"), name="vpt-rocev2")
    rayjob = the(rendered, "RayJob")
    labels = rayjob["metadata"]["labels"]
    # KubeRay's Volcano plugin copies these from the RayJob to its PodGroup (queue) and pods (priority class)
    assert (labels["volcano.sh/queue-name"], labels["ray.io/priority-class-name"]) == (
        "training",
        "training-high",
    )
    (group,) = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    worker = group["template"]
    assert worker["metadata"]["annotations"] == {"k8s.v1.cni.cncf.io/networks": "roce-net"}
    (constraint,) = worker["spec"]["topologySpreadConstraints"]
    assert constraint["labelSelector"]["matchLabels"].items() <= worker["metadata"]["labels"].items()
    assert worker["spec"]["containers"][0]["resources"]["limits"]["rdma/roce_a"] == 1


def test_the_ray_cluster_lives_a_short_grace_after_the_job_and_a_job_that_never_runs_fails(chart) -> None:
    """ttlSecondsAfterFinished is how long KubeRay keeps the Ray cluster (every GPU) after the job ends."""
    spec = the(render(chart, TABLE), "RayJob")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] <= 300
    assert spec["preRunningDeadlineSeconds"] == 1800
    assert "activeDeadlineSeconds" not in spec
    kept = the(render(chart, TABLE | {"rayJob": {"shutdownAfterJobFinishes": False}}), "RayJob")["spec"]
    assert "ttlSecondsAfterFinished" not in kept  # KubeRay refuses a TTL without the shutdown
    forever = the(render(chart, TABLE | {"rayJob": {"preRunningDeadlineSeconds": None}}), "RayJob")["spec"]
    assert "preRunningDeadlineSeconds" not in forever


def test_the_object_store_is_set_and_shared_memory_holds_it_plus_the_rest(chart) -> None:
    values = example("video-pretrain-32-nodes.yaml")
    cluster = the(render(chart, values), "RayJob")["spec"]["rayClusterSpec"]
    groups = {
        "head": (cluster["headGroupSpec"], {"objectStoreGiB": 1, "shmExtraGiB": 1}),
        "workers": (cluster["workerGroupSpecs"][0], values["workers"]),
    }
    for name, (group, sizes) in groups.items():
        store = int(group["rayStartParams"]["object-store-memory"])
        assert store == sizes["objectStoreGiB"] << 30, name
        (shm,) = [v for v in group["template"]["spec"]["volumes"] if v["name"] == "dshm"]
        assert shm["emptyDir"] == {
            "medium": "Memory",
            "sizeLimit": f"{sizes['objectStoreGiB'] + sizes['shmExtraGiB']}Gi",
        }, name


def test_ray_keeps_its_reserved_metrics_port_and_svd_serves_on_its_own(chart) -> None:
    """KubeRay reserves the container port name `metrics` for Ray's metrics (8080) and adds it only where no
    port has that name: svd's port under that name hid Ray's metrics and had Ray's scrape read svd's port."""
    rendered = render(chart, TABLE)
    cluster = the(rendered, "RayJob")["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    (workers,) = cluster["workerGroupSpecs"]
    for group in (head, workers):
        (container,) = group["template"]["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["metrics"] == int(group["rayStartParams"]["metrics-export-port"]) == 8080
    worker_ports = {
        p["name"]: p["containerPort"] for p in workers["template"]["spec"]["containers"][0]["ports"]
    }
    assert worker_ports["svd-metrics"] == METRICS_PORT
    monitor = the(rendered, "PodMonitor")
    endpoints = {e["port"]: e for e in monitor["spec"]["podMetricsEndpoints"]}
    assert set(endpoints) == {"svd-metrics", "metrics"}
    for endpoint in endpoints.values():
        (relabel,) = endpoint["relabelings"]
        assert relabel["targetLabel"] == "exporter"
    # the same `exporter` label as the Slurm scrape config: the SVDMetricsEndpointDown alert selects on it
    (slurm,) = yaml.safe_load((ROOT / "infra/prometheus/prometheus.yml").read_text())["scrape_configs"]
    assert (
        endpoints["svd-metrics"]["relabelings"][0]["replacement"]
        == slurm["relabel_configs"][0]["replacement"]
    )
    assert endpoints["metrics"]["relabelings"][0]["replacement"] == "ray"
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= head["template"]["metadata"]["labels"].items()
    )
    assert (
        monitor["spec"]["selector"]["matchLabels"].items()
        <= workers["template"]["metadata"]["labels"].items()
    )


def test_the_scraped_job_label_is_the_runs_job_name_with_or_without_honor_labels(chart) -> None:
    """Prometheus sets `job` from the pod label PodMonitor.jobLabel names; the trainer's own `job` label is
    the run's job_name. Both are the release name, so `job` reads the same under overrideHonorLabels."""
    rendered = render(chart, example("video-pretrain-32-nodes.yaml"), name="vpt-0412")
    monitor, rayjob = the(rendered, "PodMonitor"), the(rendered, "RayJob")
    run = yaml.safe_load(the(rendered, "ConfigMap")["data"]["release.yaml"])
    (workers,) = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert (
        workers["template"]["metadata"]["labels"][monitor["spec"]["jobLabel"]]
        == run["job_name"]
        == "vpt-0412"
    )


def test_two_releases_side_by_side_create_no_cluster_wide_object_twice(chart, monitoring_chart) -> None:
    """Per run: the RayJob, its ConfigMap and PodMonitor. Once per cluster (helm/svd-monitoring): the rules,
    which every Prometheus evaluates for all runs, and the dashboard, which the Grafana sidecar keys by file
    name (two copies: uninstalling one run deleted the dashboard the other used)."""
    runs = [render(chart, TABLE, name=name, namespace="ml") for name in ("vpt-a", "vpt-b")]
    cluster = render(monitoring_chart, {}, name="svd-monitoring", namespace="monitoring")

    def identities(rendered: dict) -> set[tuple[str, ...]]:
        out = set()
        for m in manifests(rendered):
            out.add((m["kind"], m["metadata"].get("namespace", ""), m["metadata"]["name"]))
            if m["kind"] == "ConfigMap" and "grafana_dashboard" in m["metadata"].get("labels", {}):
                out |= {("dashboard file", key) for key in m["data"]}
            if m["kind"] == "PrometheusRule":
                out |= {("rule group", group["name"]) for group in m["spec"]["groups"]}
        return out

    first, second, shared = (identities(r) for r in (*runs, cluster))
    assert first & second == set()
    assert {kind for kind, *_ in first} == {"RayJob", "ConfigMap", "PodMonitor"}
    assert {("dashboard file", "svd-training.json"), ("rule group", "svd-training")} <= shared
    assert shared & (first | second) == set()


def test_the_monitoring_chart_ships_the_rules_and_dashboard_of_infra(monitoring_chart, crd_schemas) -> None:
    rendered = render(monitoring_chart, {"prometheusRule": {"labels": {"release": "kube-prometheus-stack"}}})
    for manifest in manifests(rendered):
        validate(manifest, crd_schemas)
    rule = the(rendered, "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert rule["spec"] == yaml.safe_load((ROOT / "infra/prometheus/rules/svd.rules.yml").read_text())
    dashboard = the(rendered, "ConfigMap")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    text = (ROOT / "infra/grafana/svd-training.json").read_text()
    assert json.loads(dashboard["data"]["svd-training.json"]) == json.loads(text)
    assert render(
        monitoring_chart, {"prometheusRule": {"enabled": False}, "grafanaDashboard": {"enabled": False}}
    )
    report = helm.lint(MONITORING_CHART, {}, strict=True, kube_version="v1.30.0")
    assert report["errors"] == []


def test_switched_off_monitoring_and_curation_render_only_what_they_need(chart) -> None:
    assert set(render(chart, VALUE_SETS["no monitoring, no secret"])) == {
        "configmap.yaml",
        "rayjob.yaml",
        "NOTES.txt",
    }
    curate = render(chart, example("curate-cpu.yaml"))
    assert set(curate) == {"rayjob.yaml", "NOTES.txt"}
    (group,) = curate["rayjob.yaml"][0]["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert (group["groupName"], group["replicas"]) == ("cpu-workers", 16)
    (container,) = group["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert [p["name"] for p in container["ports"]] == ["metrics"]  # Ray's only: no svd endpoint in curation


def test_the_minimum_kuberay_version_is_stated_where_users_look(chart) -> None:
    minimum = yaml.safe_load((CHART / "Chart.yaml").read_text())["annotations"][
        "svd-project.github.io/min-kuberay-version"
    ]
    assert minimum == "1.6.0"  # RayJob.spec.preRunningDeadlineSeconds
    assert f"KubeRay operator {minimum} or newer" in render(chart, TABLE)["NOTES.txt"]
    assert f"KubeRay {minimum}" in (ROOT / "helm/README.md").read_text()


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
    assert cfg["metrics"] == cfg["metrics"] | {"port": METRICS_PORT, "gpu": "H100"}
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


def test_an_evaluation_release_runs_jobs_evaluate_on_ray_and_is_scraped_like_training(chart) -> None:
    rendered = render(chart, example("evaluate-watch.yaml"))
    assert set(rendered) == {"rayjob.yaml", "podmonitor.yaml", "NOTES.txt"}  # no run configuration
    rayjob = rendered["rayjob.yaml"][0]
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:2] == ["python", "jobs/evaluate.py"]
    spec = importlib.util.spec_from_file_location("evaluate_cli", ROOT / "jobs" / "evaluate.py")
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    settings, protocol, dry_run = evaluate.parse(argv[2:])
    from svd.launch.evaluation import check_settings

    check_settings(settings)
    assert (settings.launcher, settings.run, settings.watch, settings.poll_s) == (
        "ray",
        "s3://runs/runs/video-pretrain",
        True,
        300.0,
    )
    # one process per GPU of each of the 2 pods, the pod's CPUs shared among them
    assert (settings.nodes, settings.ranks_per_node, settings.cpus_per_rank) == (2, 2, 8)
    assert (protocol.name, protocol.samples, dry_run) == ("motion_adherence", 256, False)
    assert settings.metrics_port == METRICS_PORT
    (group,) = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert (group["groupName"], group["replicas"]) == ("gpu-workers", 2)
    (container,) = group["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["svd-metrics"] == METRICS_PORT
    endpoints = rendered["podmonitor.yaml"][0]["spec"]["podMetricsEndpoints"]
    assert [(e["port"], e.get("honorLabels", False)) for e in endpoints] == [
        ("svd-metrics", True),
        ("metrics", False),
    ]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (TABLE | {"job": "serve"}, "at '/job': value must be one of 'train', 'curate', 'evaluate'"),
        (
            {"job": "evaluate", "evaluate": {"run": "s3://b/runs/r"}},
            "at '/evaluate/protocol': '' does not match pattern",
        ),
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
        (
            TABLE
            | {"labels": {"kueue.x-k8s.io/queue-name": "q"}, "rayJob": {"shutdownAfterJobFinishes": False}},
            "at '/rayJob/shutdownAfterJobFinishes': value must be true",
        ),
        (
            TABLE | {"workers": {"extraVolumes": [{"name": "dshm", "emptyDir": {}}]}},
            "at '/workers/extraVolumes/0/name'",
        ),
        (
            TABLE | {"rayJob": {"preRunningDeadlineSeconds": 0}},
            "at '/rayJob/preRunningDeadlineSeconds': minimum",
        ),
        (
            TABLE
            | {"metrics": {"prometheusRule": {"enabled": True}}},  # now helm/svd-monitoring, once per cluster
            "at '/metrics': additional properties 'prometheusRule' not allowed",
        ),
    ],
    ids=[
        "job",
        "evaluation protocol",
        "table",
        "nodes",
        "gpus",
        "typo",
        "root",
        "literal key",
        "shell",
        "nodes in config",
        "kueue keeps cluster",
        "chart's volume",
        "zero deadline",
        "rules per run",
    ],
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


def test_the_image_installs_dependencies_before_the_code_and_carries_rdma_and_wget() -> None:
    """The source copied before `pip install` made every code change reinstall everything (gigabytes)."""
    lines = [line.strip() for line in (ROOT / "infra/docker/Dockerfile").read_text().splitlines()]
    copies = [i for i, line in enumerate(lines) if line.startswith("COPY ")]
    installs = [i for i, line in enumerate(lines) if "pip install" in line]
    code = lines.index("COPY . /app")
    assert code == copies[-1]
    assert max(installs) < code
    assert [lines[i].split()[1] for i in copies[:-1]] == ["pyproject.toml", "infra/docker/constraints.txt"]
    packages = " ".join(line for line in lines if "apt-get install" in line).split()
    assert {"libibverbs1", "ibverbs-providers", "wget"} <= set(packages)  # NCCL's IB/RoCE; KubeRay's probes
