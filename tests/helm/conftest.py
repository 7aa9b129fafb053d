"""The chart rendered by Helm's own template engine (helm-python-sdk embeds Helm's Go SDK), and the schemas
its manifests are checked against: Kubernetes' for built-in kinds (kubernetes-validate, strict), the CRDs'
for RayJob (KubeRay), PodMonitor and PrometheusRule (Prometheus operator)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "svd"
MONITORING_CHART = ROOT / "helm" / "svd-monitoring"
EXAMPLES = ROOT / "helm" / "examples"
KUBERNETES = "1.30.0"
TABLE = {"train": {"config": {"data": {"table": "s3://lvd/clips.lance"}}}}


def strict(schema: Any) -> Any:
    """The CRD's schema as `kubectl apply --validate=strict` applies it: an object with declared properties
    accepts no others (unless the CRD says it keeps unknown fields), so a misspelt field is an error."""
    if isinstance(schema, dict):
        schema = {key: strict(value) for key, value in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


def load_crd_schemas(paths: list[Path]) -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) → the served version's openAPIV3Schema, made strict."""
    schemas = {}
    for path in paths:
        crd = yaml.load(path.read_text(), Loader=yaml.CSafeLoader)
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served"):
                schemas[(f"{group}/{version['name']}", kind)] = strict(version["schema"]["openAPIV3Schema"])
    return schemas


@pytest.fixture(scope="session")
def crd_schemas() -> dict[tuple[str, str], dict]:
    """The vendored CRDs (crds/README.md says which releases); $SVD_KUBERAY_CRDS names the folder of
    another KubeRay release's ray.io_rayjobs.yaml to validate against instead."""
    crds = sorted((Path(__file__).parent / "crds").glob("*.yaml"))
    if os.environ.get("SVD_KUBERAY_CRDS"):
        crds.append(Path(os.environ["SVD_KUBERAY_CRDS"]) / "ray.io_rayjobs.yaml")  # later files win
    return load_crd_schemas(crds)


def validate(manifest: dict, crd_schemas: dict[tuple[str, str], dict]) -> None:
    """Raise unless `manifest` is valid for Kubernetes 1.30 (built-in kinds, strict) or for its CRD. A kind
    with neither schema raises kubernetes-validate's SchemaNotFoundError: never a pass."""
    key = (manifest["apiVersion"], manifest["kind"])
    if key in crd_schemas:
        jsonschema.Draft7Validator(crd_schemas[key]).validate(manifest)
        kubernetes_validate.validate(  # the metadata as the API server checks it for every kind
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": manifest["metadata"]},
            KUBERNETES,
            strict=True,
        )
    else:
        kubernetes_validate.validate(manifest, KUBERNETES, strict=True)


@pytest.fixture(scope="session")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


@pytest.fixture(scope="session")
def monitoring_chart() -> Iterator[helm.Chart]:
    helm.disable_logging()  # the symlinked rules and dashboard are logged at INFO on every load
    with helm.Chart.load(MONITORING_CHART) as loaded:
        yield loaded


def render(
    chart: helm.Chart, values: dict, name: str = "vpt", namespace: str = "ml"
) -> dict[str, list[dict]]:
    """template → its manifests (a template switched off renders nothing and is left out); NOTES.txt: text."""
    out = {}
    for template, text in chart.render(values, name=name, namespace=namespace).items():
        if template.endswith("NOTES.txt"):
            out["NOTES.txt"] = text
            continue
        docs = [doc for doc in yaml.safe_load_all(text) if doc]
        if docs:
            out[template.split("/templates/", 1)[1]] = docs
    return out


def manifests(rendered: dict) -> list[dict]:
    return [doc for key, docs in rendered.items() if key != "NOTES.txt" for doc in docs]


def example(name: str) -> dict:
    return yaml.safe_load((EXAMPLES / name).read_text())
