"""Prometheus file-based service discovery for jobs outside Kubernetes (Slurm): each node that serves
metrics writes one small JSON file naming its endpoint, and Prometheus (`file_sd_configs` over the
directory, infra/prometheus/) starts scraping it within seconds, and stops when the file goes.

The file names the port the endpoint actually bound, which only the serving process knows (metrics.port,
or a later one when that is taken): the launcher states what to announce (`Announcement`, passed to the
node's ranks in the environment like the multiprocess folder), and the endpoint writes it once it serves.

The file is written atomically (a temporary name, then a rename), because Prometheus re-reads the
directory whenever it changes and must never see half a file."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

TARGETS_DIR_ENV = "SVD_PROMETHEUS_TARGETS_DIR"
DEFAULT_TARGETS_DIR = "outputs/prometheus/targets"
ANNOUNCE_ENV = "SVD_PROMETHEUS_ANNOUNCE"  # an Announcement as JSON, set by the launcher on local rank 0


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


@dataclass(frozen=True)
class Announcement:
    """What a launcher wants Prometheus told about this node's endpoint; the port comes from the endpoint."""

    name: str
    host: str
    labels: dict[str, str]
    directory: str

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    def write(self, port: int) -> Path:
        return write_target(self.name, self.host, port, self.labels, Path(self.directory))

    def remove(self) -> None:
        remove_target(self.name, Path(self.directory))

    @contextmanager
    def requested(self) -> Iterator[None]:
        """Inside the block, the endpoint this process serves announces itself (`announce_from_env`); after
        it, the announcement is gone, so Prometheus stops scraping an endpoint that ended."""
        os.environ[ANNOUNCE_ENV] = self.to_env()
        try:
            yield
        finally:
            del os.environ[ANNOUNCE_ENV]
            self.remove()


def announce_from_env(port: int) -> Path | None:
    """Write the target the launcher asked for in $SVD_PROMETHEUS_ANNOUNCE, with the port served; None when
    no launcher asked (local runs, Kubernetes: the PodMonitor finds pods by their labels)."""
    request = os.environ.get(ANNOUNCE_ENV)
    return Announcement(**json.loads(request)).write(port) if request else None
