"""Prometheus file-based service discovery for jobs outside Kubernetes (Slurm): each node that serves
metrics writes one small JSON file naming its endpoint, and Prometheus (`file_sd_configs` over the
directory, infra/prometheus/) starts scraping it within seconds, and stops when the file goes.

The file is written atomically (a temporary name, then a rename), because Prometheus re-reads the
directory whenever it changes and must never see half a file."""

from __future__ import annotations

import json
import os
from pathlib import Path

TARGETS_DIR_ENV = "SVD_PROMETHEUS_TARGETS_DIR"
DEFAULT_TARGETS_DIR = "outputs/prometheus/targets"


def targets_dir() -> Path:
    return Path(os.environ.get(TARGETS_DIR_ENV, DEFAULT_TARGETS_DIR))


def write_target(
    name: str, host: str, port: int, labels: dict[str, str], directory: Path | None = None
) -> Path:
    """<directory>/<name>.json = [{"targets": ["host:port"], "labels": labels}]."""
    directory = directory or targets_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    tmp = directory / f".{name}.json.tmp"
    tmp.write_text(json.dumps([{"targets": [f"{host}:{port}"], "labels": labels}], indent=1))
    os.replace(tmp, path)
    return path


def remove_target(name: str, directory: Path | None = None) -> None:
    ((directory or targets_dir()) / f"{name}.json").unlink(missing_ok=True)
