"""Parallelism settings change how a step is computed, never what it computes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from svd.config import compose, to_yaml
from svd.data.local_s3 import free_port
from svd.launch.local import launch_local
from svd.train.metrics import MetricsConfig

ROOT = Path(__file__).resolve().parents[2]


def run(train_table: dict, name: str, *extra: str):
    cfg = compose(
        [
            "stage=video_pretrain",
            "model=tiny",
            f"data.table={train_table['table']}",
            f"checkpoint.run_dir={train_table['bucket']}/parallel/{name}",
            "data.frames=4",
            "data.fps=4",
            "train.global_batch=2",
            "train.steps=2",
            *extra,
        ]
    )
    return launch_local(cfg)


def test_activation_checkpointing_and_sharding_leave_the_losses_unchanged(train_table, s3_env):
    plain = run(train_table, "plain", "parallel.sharding=none")
    sharded = run(train_table, "fsdp", "parallel.sharding=fsdp")
    recomputed = run(train_table, "ac", "parallel.activation_checkpointing=full")
    every_other = run(train_table, "ac2", "parallel.activation_checkpointing=every_n", "parallel.ac_every=2")
    assert sharded.losses == pytest.approx(plain.losses, rel=1e-6)
    assert recomputed.losses == pytest.approx(plain.losses, rel=1e-6)
    assert every_other.losses == pytest.approx(plain.losses, rel=1e-6)


@pytest.mark.filterwarnings("ignore:DTensor random operators:UserWarning")  # CPU meshes: expected
def test_a_model_built_on_the_meta_device_trains(train_table, s3_env):
    result = run(train_table, "meta", "parallel.init_device=meta")
    assert len(result.losses) == 2
    assert all(math.isfinite(loss) for loss in result.losses)


def test_bf16_mixed_precision_trains_close_to_fp32(train_table, s3_env):
    fp32 = run(train_table, "fp32", "parallel.mixed_precision=fp32")
    bf16 = run(train_table, "bf16", "parallel.mixed_precision=bf16")
    assert bf16.losses == pytest.approx(fp32.losses, rel=0.05)
    assert bf16.losses != fp32.losses  # the bf16 path really ran


def test_every_rank_reports_its_metrics_with_job_stage_rank_and_node_labels(train_table, s3_env, monkeypatch):
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)  # the launcher sets it for its ranks
    port = free_port()
    result = run(train_table, "metrics", "gpus_per_node=2", f"metrics.port={port}", "job_name=metrics-test")
    assert result.steps == 2
    directory = MetricsConfig(port=1).directory("metrics-test")
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    samples = {
        (s.name, s.labels.get("rank")): (s.value, s.labels)
        for family in registry.collect()
        for s in family.samples
    }
    for rank in ("0", "1"):
        value, labels = samples[("svd_loss", rank)]
        assert value == pytest.approx(result.losses[-1], rel=1e-5)
        assert labels["job"] == "metrics-test"
        assert labels["stage"] == "video_pretrain"
        assert labels["node"]
        assert samples[("svd_samples_total", rank)][0] == 2  # 2 steps × 1 sample per rank


# One rank of an emulated multi-node run: the environment says where it is (as torchrun or srun would set it).
RANK = """
import json, sys
from svd.config import from_yaml
from svd.train import run
result = run(from_yaml(open(sys.argv[1]).read()))
json.dump(result.losses, open(sys.argv[2], "w"))
"""


@pytest.mark.slow
def test_hybrid_sharding_on_a_two_by_two_mesh_gives_the_losses_of_one_process(train_table, s3_env, tmp_path):
    """nodes=2 × gpus_per_node=2 on this host: LOCAL_WORLD_SIZE=2 makes each pair of ranks a node, so the
    mesh is (replicate 2, shard 2): parameters sharded within a node, gradients averaged across nodes."""
    production = ("data.num_workers=2", "train.val_every=2", "train.preview_every=2", "train.steps=2")
    one = run(train_table, "hsdp2x2-ref", "parallel.sharding=none", "train.global_batch=4", *production)
    cfg = compose(
        [
            "stage=video_pretrain",
            "model=tiny",
            f"data.table={train_table['table']}",
            f"checkpoint.run_dir={tmp_path / 'run'}",
            "data.frames=4",
            "data.fps=4",
            "train.global_batch=4",
            "nodes=2",
            "gpus_per_node=2",
            "parallel.sharding=hsdp",
            # off: both emulated nodes share this host, so their local rank 0s would serve one port
            "metrics.port=0",
            *production,
        ]
    )
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    env = os.environ | {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": "4",
        "LOCAL_WORLD_SIZE": "2",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
    }
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", RANK, str(tmp_path / "config.yaml"), str(tmp_path / f"losses{rank}.json")],
            env=env | {"RANK": str(rank), "LOCAL_RANK": str(rank % 2), "GROUP_RANK": str(rank // 2)},
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(4)
    ]
    errors = [process.communicate(timeout=600)[1] for process in ranks]
    assert [process.returncode for process in ranks] == [0, 0, 0, 0], errors[0][-3000:]
    losses = [json.loads((tmp_path / f"losses{rank}.json").read_text()) for rank in range(4)]
    assert losses[0] == pytest.approx(one.losses, rel=1e-5)
    assert losses[1:] == [losses[0]] * 3  # every rank reports the global loss

    # the checkpoint shows the mesh: each parameter in 2 shards (the shard dimension), not 4 (plain FSDP
    # over all ranks) nor 1 (replicated only); the replicas of a shard are written once
    metadata = FileSystemReader(str(tmp_path / "run/checkpoints/step-00000002")).read_metadata()
    chunks = [
        len(entry.chunks)
        for key, entry in metadata.state_dict_metadata.items()
        if key.startswith("model.model.") and isinstance(entry, TensorStorageMetadata) and entry.size[0] >= 2
    ]
    assert chunks
    assert set(chunks) == {2}
