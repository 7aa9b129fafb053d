"""What a resumed run may change (DESIGN decision 9): each setting is applied from the resumed step on, or the
run is refused in one line before it writes anything.

    resume = check_resume(cfg, storage, checkpointer)     # every rank; None for a fresh start
    step = checkpointer.load(parts)                       # then the settings that live in the state:
    apply_train_settings(optimizer, scheduler, cfg.train)  # lr, betas, … from cfg, not from the checkpoint
    print(*resume.lines(run_dir, world_size), sep="\\n")   # "resumed from step N of … (world size A → B)"

The run directory's `config.yaml` records the settings of the last run that started there. A setting is
refused when it decides what the checkpoint's tensors are (the architecture, which parameters train, the
encoders), what a sample is (size, frames, rate, conditioning scales), or which samples the checkpointed
position of the data stream stands for (table, version, filter, split, seed): going on with another value
would half-apply it. Every other setting steers training from here on (the optimizer and its schedule, the
noise distribution, batch sizes — the stream position counts samples, so another batch size reads on where
the last one stopped — the world size, where and how it runs) and is applied. `POLICY` holds the decision
for every setting of `RunConfig`; a test fails for a setting added without one.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, fields, is_dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

from svd.collectives import decided_by_rank0
from svd.config import ConfigError, RunConfig
from svd.data.storage import Storage, join

if TYPE_CHECKING:
    from svd.train.checkpoint import Checkpointer

CONFIG_FILE = "config.yaml"
SHOWN_CHANGES = 6  # in the refusal's one line; the keys of the rest are named


class Decision(Enum):
    APPLIED = "applied"
    REFUSED = "refused"


APPLIED, REFUSED = Decision.APPLIED, Decision.REFUSED

POLICY: dict[str, Decision] = {
    # where and on how many ranks it runs: DCP reshards, the loader re-slices the same stream
    "job_name": APPLIED,
    "nodes": APPLIED,
    "gpus_per_node": APPLIED,
    # the stage: what the model learns and which parameters train
    "stage.name": REFUSED,
    "stage.task": REFUSED,
    "stage.iterations": APPLIED,  # only the default of train.steps
    "stage.init_from": REFUSED,  # a resumed run starts from its checkpoint: another start needs a new run
    "stage.trainable": REFUSED,
    "stage.lora_rank": REFUSED,
    "stage.camera_motion": REFUSED,  # a filter of the data
    # the model and its frozen encoders: the checkpoint's tensors and what they were trained on
    "model.preset": REFUSED,
    "model.autoencoder": REFUSED,
    "model.autoencoder_path": REFUSED,
    "model.autoencoder_factor": REFUSED,
    "model.scale_factor": REFUSED,
    "model.text_encoder": REFUSED,
    "model.image_encoder": REFUSED,
    "model.micro_conditioning": REFUSED,
    "model.cache_dir": APPLIED,
    # the noise distribution of training: a schedule decision, like the learning rate
    "diffusion.p_mean": APPLIED,
    "diffusion.p_std": APPLIED,
    "diffusion.cond_dropout": APPLIED,
    "diffusion.cond_aug_mean": APPLIED,
    "diffusion.cond_aug_std": APPLIED,
    # which rows the stream position stands for, and what one sample is
    "data.table": REFUSED,
    "data.filter": REFUSED,
    "data.version": REFUSED,
    "data.val_split": REFUSED,  # the training rows are the rows outside it
    "data.height": REFUSED,
    "data.width": REFUSED,
    "data.frames": REFUSED,
    "data.fps": REFUSED,
    "data.serve": REFUSED,
    "data.motion_score_scale": REFUSED,  # the meaning of the motion conditioning
    "data.elevation_deg": REFUSED,  # the meaning of the camera conditioning
    # how the samples are read and batched: the position counts samples, whatever the batch
    "data.micro_batch": APPLIED,
    "data.num_workers": APPLIED,
    "data.batch_timeout_s": APPLIED,
    "data.index_timeout_s": APPLIED,
    "data.caption_weights": APPLIED,
    "data.cache_dir": APPLIED,
    # the optimizer and its schedule (apply_train_settings), the EMA, the length of the run
    "train.steps": APPLIED,
    "train.global_batch": APPLIED,
    "train.lr": APPLIED,
    "train.betas": APPLIED,
    "train.weight_decay": APPLIED,
    "train.warmup_steps": APPLIED,
    "train.schedule": APPLIED,
    "train.grad_clip": APPLIED,
    "train.nonfinite_steps_limit": APPLIED,
    "train.ema_decay": APPLIED,
    "train.seed": REFUSED,  # the sample order and every sample's noise
    "train.log_every": APPLIED,
    "train.val_every": APPLIED,
    "train.val_samples": APPLIED,
    "train.val_sigmas": APPLIED,
    "train.preview_every": APPLIED,
    "train.preview_steps": APPLIED,
    "train.preview_guidance": APPLIED,
    # how the model is spread over the ranks: parameter names and checkpoints do not depend on it
    "parallel.sharding": APPLIED,
    "parallel.mixed_precision": APPLIED,
    "parallel.activation_checkpointing": APPLIED,
    "parallel.ac_every": APPLIED,
    "parallel.compile": APPLIED,
    "parallel.init_device": APPLIED,
    "parallel.collective_timeout_s": APPLIED,
    # the run directory (found by its URI: a copied run resumes where it now is) and its bookkeeping
    "checkpoint.run_dir": APPLIED,
    "checkpoint.every": APPLIED,
    "checkpoint.keep": APPLIED,
    "checkpoint.async_save": APPLIED,
    "checkpoint.lease_ttl_s": APPLIED,
    "checkpoint.break_lease": APPLIED,
    # side jobs, the launcher, the cluster and the capacity planner: where and how it runs
    "metrics.port": APPLIED,
    "metrics.gpu": APPLIED,
    "metrics.gpu_peak_flops": APPLIED,
    "launcher.name": APPLIED,
    "launcher.master_port": APPLIED,
    "launcher.max_requeues": APPLIED,
    "launcher.folder": APPLIED,
    "launcher.wait": APPLIED,
    "launcher.ray_address": APPLIED,
    "launcher.ray_storage": APPLIED,
    "cluster.name": APPLIED,
    "cluster.gpus": APPLIED,
    "cluster.partition": APPLIED,
    "cluster.account": APPLIED,
    "cluster.qos": APPLIED,
    "cluster.constraint": APPLIED,
    "cluster.time_min": APPLIED,
    "cluster.cpus_per_task": APPLIED,
    "cluster.mem_gb": APPLIED,
    "cluster.exclusive": APPLIED,
    "cluster.signal_delay_s": APPLIED,
    "cluster.sbatch_extra": APPLIED,
    "cluster.setup": APPLIED,
    "gpu.name": APPLIED,
    "gpu.memory_gib": APPLIED,
    "gpu.bf16_tflops": APPLIED,
    "gpu.intra_node_gbps": APPLIED,
    "gpu.inter_node_gbps": APPLIED,
    "gpu.node_gpus": APPLIED,
    "plan.check": APPLIED,
    "plan.mfu": APPLIED,
    "plan.workspace_fraction": APPLIED,
    "plan.cuda_context_gib": APPLIED,
    "plan.source_mbps": APPLIED,
    # experiment tracking continues the run's tracked run (its id is in the run directory); profiling
    "tracking": APPLIED,
    "tracker.dir": APPLIED,
    "tracker.project": APPLIED,
    "tracker.wandb_mode": APPLIED,
    "tracker.mlflow_uri": APPLIED,
    "tracker.queue": APPLIED,
    "tracker.close_timeout_s": APPLIED,
    "profile.steps": APPLIED,
    "profile.ranks": APPLIED,
    "profile.memory": APPLIED,
    "profile.with_stack": APPLIED,
    "profile.record_shapes": APPLIED,
    "profile.memory_snapshot": APPLIED,
}


@dataclass(frozen=True)
class Change:
    key: str
    before: Any
    after: Any

    def __str__(self) -> str:
        return f"{self.key} {self.before!r} → {self.after!r}"


@dataclass(frozen=True)
class Resume:
    """A resume that passed the checks: the checkpoint it starts from and the settings it changes."""

    step: int
    world_size: int | None  # of the checkpoint (None: its marker predates recording it)
    applied: tuple[Change, ...]
    compared: bool  # False when the run directory had no config.yaml to compare with

    def lines(self, run_dir: str, world_size: int) -> list[str]:
        before = "?" if self.world_size is None else self.world_size
        lines = [f"resumed from step {self.step} of {run_dir} (world size {before} → {world_size})"]
        if self.applied:
            lines.append("resume: applied " + ", ".join(str(c) for c in self.applied))
        if not self.compared:
            lines.append(f"resume: {join(run_dir, CONFIG_FILE)} is missing: no setting was compared")
        return lines


def setting_keys(schema: type = RunConfig, prefix: str = "") -> list[str]:
    """Every setting of `schema` as a dotted key (a dict or list setting is one key)."""
    hints = typing.get_type_hints(schema)
    keys: list[str] = []
    for f in fields(schema):
        if is_dataclass(hints[f.name]):
            keys += setting_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def changed_settings(stored_yaml: str, cfg: RunConfig) -> list[Change]:
    """The settings whose value in `cfg` differs from `stored_yaml` (a run directory's config.yaml). A key
    that only one side has (a setting added or removed since) has nothing to compare with."""
    try:
        stored = OmegaConf.to_container(OmegaConf.create(stored_yaml))
    except Exception as e:  # OmegaConf's and YAML's errors share no base class
        raise ConfigError(f"{CONFIG_FILE} of the run cannot be read: {type(e).__name__}: {e}") from None
    new = OmegaConf.to_container(OmegaConf.structured(cfg))
    changes = []
    for key in setting_keys():
        before, after = _lookup(stored, key), _lookup(new, key)
        if before is not _ABSENT and after is not _ABSENT and before != after:
            changes.append(Change(key, before, after))
    return changes


def check_changes(stored_yaml: str, cfg: RunConfig) -> list[Change]:
    """The changes to apply; ConfigError, one line naming every refused key, when any is refused."""
    changes = changed_settings(stored_yaml, cfg)
    refused = [c for c in changes if POLICY[c.key] is REFUSED]
    if refused:
        shown = ", ".join(str(c) for c in refused[:SHOWN_CHANGES])
        rest = [c.key for c in refused[SHOWN_CHANGES:]]
        more = f" and {', '.join(rest)}" if rest else ""
        run_dir = cfg.checkpoint.run_dir
        raise ConfigError(
            f"cannot resume {run_dir} with {shown}{more}: they change what its checkpoint holds or which "
            "samples it has seen; keep them, or train in a new checkpoint.run_dir "
            f"(stage.init_from={run_dir} starts from its weights)"
        )
    return [c for c in changes if POLICY[c.key] is APPLIED]


def check_resume(cfg: RunConfig, storage: Storage, checkpointer: Checkpointer) -> Resume | None:
    """Every rank, before the run writes anything: None for a fresh start, else the resume's checkpoint and
    the settings it applies. Rank 0 reads the marker and config.yaml; a refusal is raised on every rank."""
    return decided_by_rank0(lambda: _check_resume_on_rank_zero(cfg, storage, checkpointer))


def _check_resume_on_rank_zero(cfg: RunConfig, storage: Storage, checkpointer: Checkpointer) -> Resume | None:
    marker = checkpointer.latest_marker()
    if marker is None:
        return None
    fs, path = storage.fsspec(join(cfg.checkpoint.run_dir, CONFIG_FILE))
    try:
        stored = fs.cat_file(path).decode()
    except FileNotFoundError:
        return Resume(marker["step"], marker["world_size"], (), compared=False)
    return Resume(marker["step"], marker["world_size"], tuple(check_changes(stored, cfg)), compared=True)


_ABSENT = object()


def _lookup(tree: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return _ABSENT
        tree = tree[part]
    return tree
