"""How a clip table was curated, kept in its own schema metadata (`svd.curation`), so a checkpoint trained
on it can record that (svd.train.lineage.curation_provenance reads every `svd.*` key).

Written once per run, before its first video: a run that crashes has still said how its clips were made.
A schema-metadata update is its own Lance transaction and rebases over concurrent merge-inserts (and they
over it); two concurrent metadata updates conflict, and the later one tries again. So shards committing at
once lose nothing; with shards of different settings, the last one to start is what the table says.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from datetime import UTC, datetime
from typing import Any

from svd.curate.config import CurateConfig
from svd.data.storage import Storage
from svd.data.table import TableWriteError, open_dataset
from svd.version import code_version

CURATION_KEY = "svd.curation"
# Where and how a run ran, not what it made: shards of one curation share the hash of the rest
RUN_ONLY = (
    "shard", "workers", "launcher", "shards", "cluster", "cpus_per_shard",
    "gpus_per_shard", "folder", "wait", "commit_every", "cache_dir", "tag", "report",
)  # fmt: skip
# The settings naming weights: the scoring models (CLIP + aesthetic head, OCR, captions) and the encoder
MODEL_SETTINGS = ("clip_model", "aesthetic_head", "text_detector", "captioner", "autoencoder_path")


def curation_record(cfg: CurateConfig, storage: Storage) -> dict[str, Any]:
    """The recipe (dataset card) named, the settings that decide the clips and their sha256, the sha256 of
    each model's weights (motion and the built-in detectors have none), the code version and the time."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUN_ONLY}
    encoded = json.dumps(settings, sort_keys=True, separators=(",", ":")).encode()
    models = {
        key: sha256_of(storage.local_copy(uri, cfg.cache_dir))
        for key in MODEL_SETTINGS
        if (uri := getattr(cfg, key)) and (key != "autoencoder_path" or cfg.latents)
    }
    return {
        "recipe": cfg.recipe,
        "config": settings,
        "config_sha256": hashlib.sha256(encoded).hexdigest(),
        "models_sha256": models,
        "code_version": code_version(),
        "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def sha256_of(path: str) -> str:
    """Of a file's bytes; of a folder (a Hugging Face model), over its files' relative paths and digests."""
    if not os.path.isdir(path):
        return _file_sha256(path)
    digest = hashlib.sha256()
    for folder, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(folder, name)
            digest.update(f"{os.path.relpath(full, path)}\0{_file_sha256(full)}\n".encode())
    return digest.hexdigest()


def _file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def record_curation(table_uri: str, cfg: CurateConfig, storage: Storage, attempts: int = 5) -> None:
    """Sets `svd.curation` on the table (which exists: check_output created it). Two shards starting at once
    both set it, and Lance refuses the second of two concurrent metadata updates instead of rebasing it: that
    one tries again on the table's new version, as `merge_rows` does."""
    record = json.dumps(curation_record(cfg, storage), sort_keys=True)
    for _ in range(attempts):
        table = open_dataset(table_uri, storage)
        if table is None:
            raise TableWriteError(f"{table_uri} vanished before its curation settings could be recorded")
        try:
            table.update_schema_metadata({CURATION_KEY: record})
            return
        except (ValueError, OSError) as e:
            error = e
            if "ncompatible transaction" not in str(e):
                break
    problem = str(error).splitlines()[0][:300]
    raise TableWriteError(f"cannot record curation settings on {table_uri}: {problem}") from None
