"""The typed configuration of a training run, composed from `jobs/conf/` and `key=value` overrides.

    cfg = compose(["stage=video_pretrain", "model=tiny", "nodes=1", "gpus_per_node=2", "train.lr=3e-5"])

Composition follows Hydra's conventions without Hydra's runtime: the dataclass defaults, then one YAML file
per config group (`stage/`, `model/`, `launcher/`, `cluster/`, chosen by `group=option`), then the
`key=value` overrides, merged with OmegaConf onto the structured schema. The YAML chooses values, never
classes. Every mistake is found here, before a process starts or a job is queued, and reported as one
line that names the key: an unknown key (with the closest valid one), a value of the wrong type, a batch
that does not divide, a URI that cannot be read.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

T = TypeVar("T")
CONF_DIR = Path(__file__).resolve().parents[1] / "jobs" / "conf"
GROUPS = ("stage", "model", "launcher", "cluster", "gpu")
DEFAULT_OPTIONS = {
    "stage": "video_pretrain",
    "model": "svd",
    "launcher": "local",
    "cluster": "default",
    "gpu": "h100-80gb",
}
TASKS = ("image", "text_to_video", "image_to_video", "interpolation", "multiview")
# The node's Prometheus endpoint (metrics.port). Not 9400 (dcgm-exporter's, on most GPU nodes) nor anything in
# 9100-9999 (Prometheus' exporter allocations), Ray's (8080, 8265, 6379, 10001, 52365, workers 10002-19999),
# torch's rendezvous (29400, 29500), the Slurm launcher's (15000-19999) or the ephemeral range (32768+).
METRICS_PORT = 24600


class ConfigError(ValueError):
    """A configuration mistake, phrased as one line naming the key."""


@dataclass
class StageConfig:
    name: str = "video_pretrain"
    # What the model learns: image (Stage I, stills through the image-only path), text_to_video,
    # image_to_video (noise-augmented first frame + CLIP image embedding), interpolation (first and last
    # frames given, a mask channel), multiview (orbit frames with camera micro-conditioning, SV3D layout).
    task: str = "text_to_video"
    iterations: int = 150_000  # the paper's length of the stage; train.steps defaults to it
    # A previous stage's run (its latest checkpoint's EMA weights), one checkpoint step folder, or a
    # diffusers UNet folder. Added, dropped and reshaped parameters are reported, not fatal.
    init_from: str | None = None
    trainable: str = "all"  # all | lora (camera-motion LoRA: only the adapters train)
    lora_rank: int = 16
    camera_motion: str | None = None  # camera_lora: the camera_motion subset trained on (e.g. zoom_in)


@dataclass
class ModelConfig:
    preset: str = "svd"  # tiny | small | svd (svd.model.video_unet.PRESETS)
    autoencoder: str = "kl_temporal"  # kl_temporal | kl | space_to_depth
    autoencoder_path: str | None = None  # diffusers folder/URI of the VAE; None: tiny random (tests only)
    autoencoder_factor: int = 2  # space_to_depth only: pixels per latent side
    scale_factor: float = 0.18215
    # Frozen encoders (Hugging Face CLIP folders or URIs). None: an empty context (unconditional).
    text_encoder: str | None = None
    image_encoder: str | None = None
    micro_conditioning: str = "svd"  # svd: fps, motion bucket, cond_aug; sv3d: cond_aug, elevation, azimuth
    cache_dir: str = str(Path.home() / ".cache" / "svd" / "models")  # node-local copies of remote weights


@dataclass
class DiffusionConfig:
    p_mean: float = -1.2  # ln σ ~ N(p_mean, p_std²) during training
    p_std: float = 1.0
    cond_dropout: float = 0.15  # share of samples trained without conditioning (classifier-free guidance)
    cond_aug_mean: float = -3.0  # image-to-video: ln σ of the noise added to the conditioning frame
    cond_aug_std: float = 0.5


@dataclass
class DataConfig:
    table: str = MISSING  # URI of the curated Lance clip table
    filter: str | None = None  # Lance SQL predicate, e.g. a recipe's filter
    version: str | None = None  # table version number or tag; None: the latest, pinned for the run
    val_split: str = "val"  # rows with this `split` are held out for the validation loss
    height: int = 256  # pixels
    width: int = 384
    frames: int = 14
    fps: float = 8.0  # frame rate at which clips are sampled
    micro_batch: int = 1  # samples per rank per forward/backward
    num_workers: int = 4
    batch_timeout_s: float = 600.0  # the longest wait for one batch from a loader worker
    index_timeout_s: float = 3600.0  # the longest wait for rank 0's row-index build (a scan of the table)
    serve: str = "auto"  # auto | frames | latents (auto: latents when the table has them)
    motion_score_scale: float = 1.0
    caption_weights: list[float] | None = None
    elevation_deg: float = 10.0  # multiview: orbit elevation when the table gives none
    cache_dir: str = str(Path.home() / ".cache" / "svd" / "row_index")


@dataclass
class TrainConfig:
    steps: int | None = None  # optimizer steps; None: stage.iterations
    global_batch: int = 1536  # samples per optimizer step over all ranks (= dp × micro_batch × accumulation)
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.01
    warmup_steps: int = 1000
    schedule: str = "constant"  # constant | cosine (after warmup)
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    # A step whose loss or gradient norm is not finite is skipped (no update); so many in a row stop a run.
    nonfinite_steps_limit: int = 5
    ema_decay: float = 0.9999
    seed: int = 0
    log_every: int = 10  # progress line and metrics
    val_every: int = 1000  # validation loss on the held-out split at fixed σ; 0 disables
    val_samples: int = 8  # held-out samples per validation (over all ranks)
    val_sigmas: list[float] = field(default_factory=lambda: [0.05, 0.3, 1.0, 3.0, 10.0])
    preview_every: int = 1000  # a video sampled with the EMA weights; 0 disables
    preview_steps: int = 25  # Euler steps of the preview sampler
    preview_guidance: list[float] = field(default_factory=lambda: [1.0, 2.5])  # first → last frame


@dataclass
class ParallelConfig:
    sharding: str = "auto"  # auto (hsdp across nodes, fsdp within) | fsdp | hsdp | none
    mixed_precision: str = "auto"  # auto (bf16 where the device supports it) | bf16 | fp32
    activation_checkpointing: str = "none"  # none | full | every_n (with ac_every)
    ac_every: int = 2
    compile: bool = False  # torch.compile each block pair
    # Where the model is built: meta (then sharded and initialised shard by shard), direct (on the device),
    # or auto (meta above 100M parameters)
    init_device: str = "auto"
    collective_timeout_s: float = 600.0  # a dead rank fails the job after this, instead of hanging it


@dataclass
class CheckpointConfig:
    run_dir: str = "outputs/runs/${job_name}"  # any URI: checkpoints, previews and the config go here
    every: int = 1000
    keep: int = 3
    async_save: bool = True
    # One run at a time owns run_dir (svd/train/lease.py). A run that died without releasing it keeps it this
    # long after its last renewal; a restart of the same job (Slurm requeue, Ray worker group) takes it back.
    lease_ttl_s: float = 300.0
    break_lease: bool = False  # take run_dir from the run holding it: only when that run is known to be dead


@dataclass
class MetricsConfig:
    port: int = METRICS_PORT  # one Prometheus endpoint per node (or the next free port); 0: none
    gpu: str | None = None  # key of the peak-FLOP/s table; None: matched to the device name
    # bf16 dense peak FLOP/s by GPU name, added to (or replacing entries of) svd.train.metrics.PEAK_FLOPS
    gpu_peak_flops: dict[str, float] = field(default_factory=dict)


TRACKING_BACKENDS = ("tensorboard", "wandb", "mlflow")


@dataclass
class TrackerConfig:
    """Where the `tracking` backends write (svd/train/tracking.py). Rank 0 logs; a backend that fails is
    counted and reported once, never a reason to stop training."""

    # A local or shared folder (not an object-store URI: the clients write files): TensorBoard event files,
    # W&B offline runs and the MLflow file store, each in a folder named by the run's tracking id
    dir: str = "outputs/tracking/${job_name}"
    project: str = "svd"  # the W&B project and the MLflow experiment
    wandb_mode: str = "offline"  # offline (sync later with `wandb sync`) | online
    mlflow_uri: str = ""  # a tracking server (http://host:5000); empty: a file store under tracker.dir
    queue: int = 1000  # records waiting for the backends; past it they are dropped (and counted)
    close_timeout_s: float = 60.0  # at the end of the run, the longest wait for records still queued


@dataclass
class ProfileConfig:
    """A torch.profiler trace of chosen steps (svd/train/profiling.py); off, it costs nothing."""

    steps: list[int] = field(default_factory=list)  # [first, last] step traced (1-based); empty: off
    ranks: list[int] = field(default_factory=lambda: [0])  # the ranks that trace
    memory: bool = False  # tensor allocations in the trace (profile_memory)
    with_stack: bool = False  # the Python stack of each operator
    record_shapes: bool = False  # input shapes of each operator
    # CUDA: record the allocator's history; a snapshot is written when the trace ends and on out-of-memory
    memory_snapshot: bool = False


@dataclass
class LauncherConfig:
    name: str = "local"  # local | slurm | ray
    master_port: int = 0  # local: the rendezvous port; 0 picks a free one
    # slurm: requeues after a crash before the job is given up (a preemption or time limit always requeues);
    # ray: FailureConfig.max_failures
    max_requeues: int = 3
    # slurm: submitit's logs and pickles, and each job's crash count (a filesystem every node shares)
    folder: str = "outputs/launch/${job_name}"
    wait: bool = False  # slurm/ray: stay until the job ends and report its result (else print the job id)
    ray_address: str = ""  # ray: the cluster to join; empty: $RAY_ADDRESS, else a local Ray on this host
    ray_storage: str = ""  # ray: RunConfig.storage_path; empty: <checkpoint.run_dir>/ray


@dataclass
class ClusterConfig:
    """Where a Slurm or Ray job runs: site defaults live in jobs/conf/cluster/<site>.yaml."""

    name: str = "default"
    gpus: bool = True  # request gpus_per_node GPUs per node (false on a CPU-only partition)
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""  # e.g. h100
    time_min: int = 4320  # the job's time limit; a requeue after it resumes from the latest checkpoint
    cpus_per_task: int = 8  # per rank (data-loader workers and the rank itself)
    mem_gb: int = 0  # per node; 0: Slurm's default (--mem=0 with exclusive: the whole node)
    exclusive: bool = True
    signal_delay_s: int = 120  # the stop signal comes this long before the time limit (save + requeue)
    sbatch_extra: dict[str, str] = field(default_factory=dict)  # more #SBATCH options: {mail-user: me@x}
    setup: list[str] = field(default_factory=list)  # shell lines run before the ranks (module load …)


@dataclass
class GpuConfig:
    """One GPU kind of the catalogue (jobs/conf/gpu/<kind>.yaml): what the capacity planner plans for."""

    name: str = "h100-80gb"
    memory_gib: float = 79.6  # device memory as nvidia-smi reports it
    bf16_tflops: float = 989.0  # dense bf16 tensor-core peak, TFLOP/s
    intra_node_gbps: float = 450.0  # GB/s per GPU, one direction, between GPUs of a node (NVLink)
    inter_node_gbps: float = 50.0  # GB/s per GPU, one direction, between nodes (InfiniBand/RoCE)
    node_gpus: int = 8  # GPUs in one node of this kind (the planner's default gpus_per_node)


@dataclass
class PlanConfig:
    """Assumptions of the capacity planner (svd/launch/plan.py) and whether launch.py consults it."""

    check: bool = True  # launch.py refuses a GPU job whose plan does not fit the GPU's memory
    mfu: float = 0.35  # share of the bf16 peak sustained on the FLOPs a step executes (recompute included)
    workspace_fraction: float = 0.10  # allocator fragmentation and kernel workspaces, of everything else
    cuda_context_gib: float = 0.75  # CUDA context, NCCL buffers and libraries, per process
    # bitrate of the stored clips (Mbit/s): serving frames, the loader reads the span of source video
    # that covers the sampled frames (data.frames / data.fps seconds)
    source_mbps: float = 8.0


@dataclass
class RunConfig:
    job_name: str = "${stage.name}"
    nodes: int = 1
    gpus_per_node: int = 1  # processes per node (one per GPU; CPU processes here)
    stage: StageConfig = field(default_factory=StageConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    gpu: GpuConfig = field(default_factory=GpuConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    # Experiment trackers rank 0 logs to: any of TRACKING_BACKENDS (model=tiny: none)
    tracking: list[str] = field(default_factory=lambda: ["tensorboard"])
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def steps(self) -> int:
        return self.train.steps if self.train.steps is not None else self.stage.iterations

    @property
    def grad_accumulation(self) -> int:
        return self.train.global_batch // (self.world_size * self.data.micro_batch)


def options(group: str) -> list[str]:
    """The choices of a config group: the YAML files in jobs/conf/<group>/."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def split_args(args: list[str]) -> tuple[dict[str, str], list[str]]:
    """(group choices, key=value overrides); anything that is not key=value is an error."""
    choices, overrides = dict(DEFAULT_OPTIONS), []
    for arg in args:
        if "=" not in arg:
            raise ConfigError(f"arguments are key=value or group=option; got {arg!r} (see --help)")
        key, value = arg.split("=", 1)
        if key in GROUPS:
            if value not in options(key):
                hint = suggest(value, options(key))
                raise ConfigError(f"{key}={value!r} is not an option; choose one of {options(key)}{hint}")
            choices[key] = value
        else:
            overrides.append(arg)
    return choices, overrides


def compose(args: list[str], *, check_uris: bool = False) -> RunConfig:
    """The run's configuration from `group=option` and `key=value` arguments, validated."""
    choices, overrides = split_args(args)
    merged: DictConfig = OmegaConf.structured(RunConfig)
    with config_errors(RunConfig):
        for group in GROUPS:
            merged = OmegaConf.merge(merged, OmegaConf.load(CONF_DIR / group / f"{choices[group]}.yaml"))
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(overrides))
        cfg: RunConfig = OmegaConf.to_object(merged)
    validate(cfg, check_uris=check_uris)
    return cfg


def parse_settings(schema: type[T], argv: list[str]) -> T:
    """`key=value` arguments onto a settings dataclass (the convention of every job in `jobs/`)."""
    bad = [a for a in argv if "=" not in a]
    if bad:
        raise ConfigError(f"arguments are key=value; got {bad[0]!r} (see --help)")
    with config_errors(schema):
        return OmegaConf.to_object(
            OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.from_dotlist(argv))
        )


@contextmanager
def config_errors(schema: type) -> Iterator[None]:
    """OmegaConf's errors as one line naming the key: the closest valid key for an unknown one."""
    try:
        yield
    except ConfigKeyError as e:
        raise ConfigError(_unknown_key_message(e, schema)) from None
    except MissingMandatoryValue as e:
        raise ConfigError(f"{e.full_key} is required") from None
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or getattr(e, "key", None) or "?"
        raise ConfigError(f"{key}: {str(e).splitlines()[0]}") from None


def to_yaml(cfg: RunConfig) -> str:
    """The resolved configuration, as `--cfg` prints it and the run directory keeps it."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_yaml(text: str) -> RunConfig:
    """Inverse of `to_yaml` (how a launched rank or a resumed run reads its configuration back)."""
    merged = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.create(text))
    return OmegaConf.to_object(merged)


def _unknown_key_message(e: ConfigKeyError, schema: type) -> str:
    full = str(getattr(e, "full_key", "") or getattr(e, "key", ""))
    parent, _, leaf = full.rpartition(".")
    node: Any = schema
    for part in parent.split(".") if parent else []:
        node = {f.name: f for f in fields(node)}[part].default_factory  # type: ignore[misc]
    names = [f.name for f in fields(node)] if is_dataclass(node) else []
    if not parent and schema is RunConfig:
        names += list(GROUPS)
    return f"unknown key {full!r}{suggest(leaf, names, prefix=f'{parent}.' if parent else '')}"


def suggest(word: str, candidates: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f"; did you mean {prefix + close[0]!r}?" if close else ""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _choice(key: str, value: object, allowed: tuple[str, ...]) -> None:
    _check(value in allowed, f"{key}={value!r}: choose one of {list(allowed)}")


# Ranges of the settings, by dotted key. Every numeric setting is in one of these tables or has a range of its
# own in `_check_ranges`: a value outside its range would otherwise fail hours into a run (a division by zero
# at the first validation, a collective that times out at once), or never.
AT_LEAST_ONE = (
    "nodes",
    "gpus_per_node",
    "stage.iterations",
    "stage.lora_rank",
    "model.autoencoder_factor",
    "data.height",
    "data.width",
    "data.frames",
    "data.micro_batch",
    "train.global_batch",
    "train.log_every",
    "train.val_samples",
    "train.preview_steps",
    "train.nonfinite_steps_limit",
    "parallel.ac_every",
    "tracker.queue",
    "checkpoint.every",
    "checkpoint.keep",
    "gpu.node_gpus",
)
AT_LEAST_ZERO = (  # 0 is "off" or "none" for each of these (see the settings' comments)
    "data.num_workers",
    "diffusion.cond_aug_std",
    "train.weight_decay",
    "train.warmup_steps",
    "train.grad_clip",
    "train.seed",
    "train.val_every",
    "train.preview_every",
    "launcher.max_requeues",
    "plan.workspace_fraction",
    "plan.cuda_context_gib",
)
ABOVE_ZERO = (
    "model.scale_factor",
    "diffusion.p_std",
    "data.fps",
    "data.batch_timeout_s",
    "data.index_timeout_s",
    "data.motion_score_scale",
    "train.lr",
    "parallel.collective_timeout_s",
    "checkpoint.lease_ttl_s",
    "gpu.memory_gib",
    "gpu.bf16_tflops",
    "gpu.intra_node_gbps",
    "gpu.inter_node_gbps",
    "plan.source_mbps",
    "tracker.close_timeout_s",
)
PORTS = ("metrics.port", "launcher.master_port")  # 0: none (metrics), a free one (rendezvous)
NOT_EMPTY = (  # names and paths that something is written under or read from
    "job_name",
    "stage.name",
    "model.cache_dir",
    "data.table",
    "data.val_split",
    "data.cache_dir",
    "checkpoint.run_dir",
    "launcher.folder",
    "gpu.name",
    "tracker.dir",
    "tracker.project",
)
NOT_EMPTY_WHEN_SET = (  # None has a meaning (see the comments above); an empty string has none
    "model.autoencoder_path",
    "data.version",
    "metrics.gpu",
)


def setting(cfg: Any, key: str) -> Any:
    """The value of a dotted key (`train.lr`) of a configuration dataclass."""
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def validate(cfg: RunConfig, *, check_uris: bool = False) -> None:
    """Raises ConfigError naming the first impossible setting: ranges first, then how settings combine."""
    _check_choices(cfg)
    _check_ranges(cfg)
    _check_combinations(cfg)
    if check_uris:
        _check_uris(cfg)


def _check_choices(cfg: RunConfig) -> None:
    from svd.model.autoencoder import KINDS
    from svd.model.video_unet import PRESETS

    _choice("stage.task", cfg.stage.task, TASKS)
    _choice("stage.trainable", cfg.stage.trainable, ("all", "lora"))
    _choice("model.preset", cfg.model.preset, tuple(PRESETS))
    _choice("model.autoencoder", cfg.model.autoencoder, KINDS)
    _choice("model.micro_conditioning", cfg.model.micro_conditioning, ("svd", "sv3d"))
    _choice("data.serve", cfg.data.serve, ("auto", "frames", "latents"))
    _choice("train.schedule", cfg.train.schedule, ("constant", "cosine"))
    _choice("parallel.sharding", cfg.parallel.sharding, ("auto", "fsdp", "hsdp", "none"))
    _choice("parallel.mixed_precision", cfg.parallel.mixed_precision, ("auto", "bf16", "fp32"))
    _choice(
        "parallel.activation_checkpointing",
        cfg.parallel.activation_checkpointing,
        ("none", "full", "every_n"),
    )
    _choice("parallel.init_device", cfg.parallel.init_device, ("auto", "meta", "direct"))
    _choice("launcher.name", cfg.launcher.name, ("local", "slurm", "ray"))
    _choice("tracker.wandb_mode", cfg.tracker.wandb_mode, ("offline", "online"))
    tracking = list(cfg.tracking)
    _check(
        all(b in TRACKING_BACKENDS for b in tracking) and len(set(tracking)) == len(tracking),
        f"tracking={tracking}: choose any of {list(TRACKING_BACKENDS)}, each once",
    )


def _check_ranges(cfg: RunConfig) -> None:
    for key in NOT_EMPTY:
        _check(setting(cfg, key) != "", f"{key} is empty")
    for key in NOT_EMPTY_WHEN_SET:
        _check(setting(cfg, key) != "", f"{key} is empty: give a value, or null")
    for key in AT_LEAST_ONE:
        _check(setting(cfg, key) >= 1, f"{key}={setting(cfg, key)} must be ≥ 1")
    for key in AT_LEAST_ZERO:
        _check(setting(cfg, key) >= 0, f"{key}={setting(cfg, key)} must be ≥ 0")
    for key in ABOVE_ZERO:
        _check(setting(cfg, key) > 0, f"{key}={setting(cfg, key)} must be > 0")
    for key in PORTS:
        _check(0 <= setting(cfg, key) <= 65535, f"{key}={setting(cfg, key)} must be a port in [0, 65535]")
    _check(cfg.train.steps is None or cfg.train.steps >= 1, f"train.steps={cfg.train.steps} must be ≥ 1")
    d, t, p = cfg.diffusion, cfg.train, cfg.plan
    _check(0 <= d.cond_dropout <= 1, f"diffusion.cond_dropout={d.cond_dropout} must be in [0, 1]")
    _check(0 <= t.ema_decay < 1, f"train.ema_decay={t.ema_decay} must be in [0, 1)")
    _check(0 < p.mfu <= 1, f"plan.mfu={p.mfu} must be in (0, 1]")
    elevation = cfg.data.elevation_deg
    _check(-90 <= elevation <= 90, f"data.elevation_deg={elevation} must be in [-90, 90]")
    _check(
        len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas),
        f"train.betas={list(t.betas)} must be two values in [0, 1)",
    )
    _check(
        len(t.val_sigmas) >= 1 and min(t.val_sigmas) > 0,
        f"train.val_sigmas={list(t.val_sigmas)} must be one or more noise levels, each > 0",
    )
    _check(
        len(t.preview_guidance) == 2 and min(t.preview_guidance) >= 0,
        f"train.preview_guidance={list(t.preview_guidance)} must be [first, last], each ≥ 0",
    )
    weights = cfg.data.caption_weights
    _check(
        weights is None or (len(weights) >= 1 and min(weights) >= 0 and sum(weights) > 0),
        f"data.caption_weights={weights} must be null (equal) or a weight ≥ 0 per caption slot, "
        "with a positive sum",
    )
    for name, peak in cfg.metrics.gpu_peak_flops.items():
        _check(peak > 0, f"metrics.gpu_peak_flops.{name}={peak} must be > 0")
    check_cluster_settings(cfg.cluster)
    _check_profile(cfg.profile, cfg.world_size)
    tracker_dir = cfg.tracker.dir
    _check(
        "://" not in tracker_dir,
        f"tracker.dir={tracker_dir}: must be a local or shared folder (the tracking clients write files)",
    )


def _check_profile(profile: ProfileConfig, world_size: int) -> None:
    steps, ranks = list(profile.steps), list(profile.ranks)
    _check(
        not steps or (len(steps) == 2 and 1 <= steps[0] <= steps[1]),
        f"profile.steps={steps} must be [first, last] with 1 ≤ first ≤ last, or [] (off)",
    )
    _check(
        len(ranks) >= 1 and all(0 <= r < world_size for r in ranks),
        f"profile.ranks={ranks} must name one or more ranks in [0, {world_size - 1}]",
    )


def check_cluster_settings(cluster: ClusterConfig) -> None:
    """The ranges of a cluster's settings (also checked on their own for curation's Slurm jobs)."""
    _check(cluster.name != "", "cluster.name is empty")
    for key in ("time_min", "cpus_per_task"):
        _check(getattr(cluster, key) >= 1, f"cluster.{key}={getattr(cluster, key)} must be ≥ 1")
    _check(cluster.mem_gb >= 0, f"cluster.mem_gb={cluster.mem_gb} must be ≥ 0 (0: Slurm's default)")
    _check(
        0 <= cluster.signal_delay_s < cluster.time_min * 60,
        f"cluster.signal_delay_s={cluster.signal_delay_s} must be ≥ 0 and shorter than "
        f"cluster.time_min={cluster.time_min} minutes",
    )
    for name, value in cluster.sbatch_extra.items():
        _check(value != "", f"cluster.sbatch_extra.{name} is empty: sbatch needs a value")


def _check_combinations(cfg: RunConfig) -> None:
    per_step = cfg.world_size * cfg.data.micro_batch
    _check(
        cfg.train.global_batch % per_step == 0,
        f"train.global_batch={cfg.train.global_batch} is not divisible by data-parallel size "
        f"{cfg.world_size} "
        f"(nodes={cfg.nodes} × gpus_per_node={cfg.gpus_per_node}) × data.micro_batch={cfg.data.micro_batch}",
    )
    if cfg.stage.task == "image":
        _check(cfg.data.frames == 1, f"data.frames={cfg.data.frames}: stage.task=image trains on stills (1)")
    else:
        _check(cfg.data.frames >= 2, f"data.frames={cfg.data.frames}: a video task needs ≥ 2 frames")
    if cfg.stage.task == "interpolation":
        _check(cfg.data.frames >= 3, "data.frames must be ≥ 3 for interpolation (first, last and between)")
    if cfg.stage.task == "multiview":
        _check(
            cfg.model.micro_conditioning == "sv3d", "stage.task=multiview needs model.micro_conditioning=sv3d"
        )
    if cfg.model.autoencoder == "space_to_depth":
        for key in ("height", "width"):
            value = getattr(cfg.data, key)
            _check(
                value % cfg.model.autoencoder_factor == 0,
                f"data.{key}={value} is not a multiple of "
                f"model.autoencoder_factor={cfg.model.autoencoder_factor}",
            )


def _check_uris(cfg: RunConfig) -> None:
    """Every URI the run reads must be readable now, not after the job waited in a queue."""
    from svd.data.storage import Storage

    storage = Storage.from_env()
    readable = [("data.table", cfg.data.table), ("stage.init_from", cfg.stage.init_from)]
    readable += [
        (f"model.{k}", getattr(cfg.model, k)) for k in ("autoencoder_path", "text_encoder", "image_encoder")
    ]
    for key, uri in readable:
        if not uri:
            continue
        try:
            fs, path = storage.fsspec(uri)
            exists = fs.exists(path)
        except Exception as e:  # any client error is a reason the run cannot start
            raise ConfigError(
                f"{key}={uri}: cannot be read ({type(e).__name__}: {e}){storage.timeout_hint(e)}"
            ) from None
        _check(exists, f"{key}={uri}: does not exist")
