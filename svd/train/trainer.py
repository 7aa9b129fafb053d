"""The training loop of every stage, identical on one CPU process and on 32 GPU nodes.

    Trainer(cfg, env).fit()     # build → restore (or init_from) → loop → save

Build: the UNet for the stage's task (on `meta` for large models, materialised after sharding), LoRA or
frozen temporal layers where the stage says so, FSDP2 via `parallel.parallelize`, AdamW, the EMA, the
frozen encoders (`task.Task`). Restore: the latest complete checkpoint of the run directory, else the
weights of `stage.init_from`; the clip loader for this rank at the position the checkpoint recorded.
Loop: `grad_accumulation` micro-batches per optimizer step, gradient clipping, the EMA update, metrics
and a progress line, checkpoints, validation and previews (`validation.py`) when due.

A step whose gradient norm is not finite (a NaN or infinite loss on any rank makes it so, through the
gradient all-reduce) is skipped: no update of the weights or of the EMA; it is counted, and
`train.nonfinite_steps_limit` such steps in a row stop the run. The weights are checked again before
every save, so a checkpoint never holds non-finite values and `checkpoint.keep` never prunes toward one.
"""

from __future__ import annotations

import dataclasses
import math
import socket
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from svd.collectives import decided_by_rank0
from svd.config import RunConfig, to_yaml
from svd.data.buckets import Bucket
from svd.data.loader import ClipLoader, LoaderConfig, LoaderError, open_table, share_row_index
from svd.data.storage import Storage, join
from svd.diffusion.edm import Denoiser, weighted_denoising_error
from svd.model.video_unet import VideoUNet
from svd.train import lineage, parallel, served
from svd.train.checkpoint import (
    Checkpointer,
    CheckpointError,
    ModelOptimizerState,
    checkpoint_folder,
    read_part,
)
from svd.train.distributed import DistEnv, init_distributed
from svd.train.ema import EMA
from svd.train.lease import RunDirOwner, hold_run_dir
from svd.train.metrics import MetricsConfig, ProgressLine, TrainMetrics, flops_per_sample, serve_node_metrics
from svd.train.optim import apply_train_settings, build_optimizer, build_scheduler, clip_gradients
from svd.train.profiling import StepProfiler
from svd.train.resume import check_resume
from svd.train.run_files import RunFiles
from svd.train.stop import StopRequest
from svd.train.task import Task, unet_config
from svd.train.tracking import Record, Tracker
from svd.train.validation import Previewer, Validator
from svd.train.weights import load_initial_weights

META_INIT_PARAMS = 100_000_000  # parallel.init_device=auto: build on `meta` above this many parameters


class NonFiniteError(RuntimeError):
    """Training produced non-finite values the run cannot step over; the message says where."""


@dataclass
class TrainResult:
    steps: int  # optimizer steps completed in the run directory (including earlier runs)
    resumed_from: int | None
    losses: list[float] = field(default_factory=list)  # global mean loss per step of this process's run
    step_seconds: list[float] = field(default_factory=list)
    data_wait_seconds: list[float] = field(default_factory=list)  # of each step, waiting for batches
    # Of each iteration that ran to its end: the step, then the checkpoint, validation and preview after it.
    loop_seconds: list[float] = field(default_factory=list)
    checkpoint_blocked_seconds: list[float] = field(default_factory=list)  # how long each save held the loop
    peak_memory_bytes: int = 0  # of the device (CUDA), else of the process (max RSS)
    flops_per_sample: float | None = None  # forward + backward, counted when MFU is reported
    peak_flops: float | None = None  # of the device, from the metrics table
    validation: list[dict[str, float]] = field(default_factory=list)
    stopped: bool = False  # a stop request ended the run early, after a checkpoint of its last step
    nonfinite_steps: list[int] = field(default_factory=list)  # steps skipped for a non-finite gradient


@dataclass(frozen=True)
class StepOutcome:
    loss: float  # global mean over the step's samples
    grad_norm: float  # global, before clipping
    data_wait: float  # seconds this rank waited for batches
    stop: bool  # some rank was asked to stop: every rank saves this step and returns
    applied: bool  # False: the gradient was not finite and the step changed no weight


def loader_config(cfg: RunConfig, *, validation: bool) -> LoaderConfig:
    """The clip loader of a run's training (or validation) split: what decides which rows its stream
    reads. Provenance derives it again from a checkpoint's recorded config."""
    d = cfg.data
    parts = [f"({d.filter})"] if d.filter else []
    parts.append(f"split = '{d.val_split}'" if validation else f"(split IS NULL OR split != '{d.val_split}')")
    if cfg.stage.camera_motion and not validation:
        parts.append(f"camera_motion = '{cfg.stage.camera_motion}'")
    needs_pixels = cfg.stage.task in ("image_to_video", "multiview")
    return LoaderConfig(
        table=d.table,
        buckets=(Bucket(d.height, d.width, d.frames, d.micro_batch, fps=d.fps),),
        filter=" AND ".join(parts),
        version=int(d.version) if d.version and d.version.isdigit() else d.version,
        seed=cfg.train.seed,
        # Validation reads a few batches per call: workers would cost more to start than they save.
        num_workers=0 if validation else d.num_workers,
        serve="frames" if needs_pixels else d.serve,
        motion_score_scale=d.motion_score_scale,
        caption_weights=tuple(d.caption_weights) if d.caption_weights else None,
        cache_dir=d.cache_dir,
        batch_timeout_s=d.batch_timeout_s,
        index_timeout_s=d.index_timeout_s,
        exclude=d.exclude,
    )


class Trainer:
    def __init__(
        self,
        cfg: RunConfig,
        env: DistEnv,
        storage: Storage | None = None,
        stop: StopRequest | None = None,
        owner: RunDirOwner | None = None,
    ):
        self.cfg, self.env = cfg, env
        # Confirmed before each write: raises on every rank when another run took the run directory.
        self.owner = owner or RunDirOwner(lease=None)
        self.stop = stop or StopRequest()
        self.storage = storage or Storage.from_env()
        self.device = env.device
        self.task = Task.build(cfg, self.device)
        self.model = self._build_model()
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.scheduler = build_scheduler(self.optimizer, cfg.train, cfg.steps)
        self.ema = EMA(self.model, cfg.train.ema_decay)
        self.loader: ClipLoader | None = None  # built by `_restore`, at its checkpointed state
        self.lineage: dict[str, Any] = {}  # begun by `_restore`, saved with the loader state (lineage.py)
        self.exclude = cfg.data.exclude  # the takedown list in force: `_restore` carries an earlier one on
        self.served = served.log_from_env(env.rank)  # tests only: every sample served, to check provenance
        self.checkpointer = Checkpointer(
            cfg.checkpoint.run_dir,
            self.storage,
            keep=cfg.checkpoint.keep,
            async_save=cfg.checkpoint.async_save,
            collective_timeout_s=cfg.parallel.collective_timeout_s,
            before_commit=self.owner.confirm_here,
        )
        self.files = RunFiles(cfg.checkpoint.run_dir, self.storage)
        self.validator = Validator(
            cfg, env, self.task, lambda: self._build_loader(state=None, validation=True), self.files
        )
        self.previewer = Previewer(cfg, env, self.task, self.files)
        self.preview_batch: dict[str, Any] | None = None  # the run's first batch: previews condition on it
        self.metrics: TrainMetrics | None = None
        self.flops: float | None = None
        self.peak_flops: float | None = None
        self.nonfinite_in_row = 0
        self.progress = ProgressLine(cfg.steps, cfg.train.log_every) if env.is_main else None
        self.tracker: Tracker | None = None  # rank 0's, once the run directory is known to be ours
        self.profiler = StepProfiler(cfg.profile, env, self.files, write=lambda line: print(line, flush=True))

    # ---- build -------------------------------------------------------------------------------------
    def _build_model(self) -> Denoiser:
        cfg = self.cfg
        unet_cfg = unet_config(cfg, self.task.latent_channels)
        missing = self.task.latent_channels if cfg.stage.task == "interpolation" else 0
        with torch.device("meta"):
            size = sum(p.numel() for p in VideoUNet(unet_cfg).parameters())
        init = cfg.parallel.init_device
        on_meta = init == "meta" or (init == "auto" and size > META_INIT_PARAMS)
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank and world size
        with torch.device("meta" if on_meta else self.device):
            model = Denoiser(VideoUNet(unet_cfg), missing_frame_channels=missing)
        self._choose_trainable(model)
        mesh = parallel.build_mesh(self.env, cfg.parallel.sharding, cfg.parallel.collective_timeout_s)
        parallel.parallelize(model, list(model.network.block_pairs()), mesh, cfg.parallel, self.device)
        if on_meta:
            model.to_empty(device=self.device)
            with torch.no_grad():
                model.network.init_weights()
                if model.missing_frame is not None:
                    model.missing_frame.zero_()
        return model

    def _choose_trainable(self, model: Denoiser) -> None:
        if self.cfg.stage.trainable == "lora":
            from svd.model.lora import apply_lora

            apply_lora(model.network, rank=self.cfg.stage.lora_rank)
        elif self.cfg.stage.task == "image":
            for _, p in model.network.temporal_parameters():  # Stage I: the temporal layers stay untouched
                p.requires_grad_(False)

    def _build_loader(self, state: dict[str, Any] | None, *, validation: bool = False) -> ClipLoader:
        """Every rank reads the same table version (rank 0 resolves it: a curation commit may land while the
        ranks start); rank 0 builds the row index once for the run, the others wait for it, then open it."""
        config = dataclasses.replace(loader_config(self.cfg, validation=validation), exclude=self.exclude)
        if state is None:
            version = decided_by_rank0(
                lambda: open_table(config.table, self.storage, config.version).version,
                failed=lambda cause: LoaderError(f"rank 0 could not open {config.table}: {cause}"),
            )
            config = dataclasses.replace(config, version=version)

        shared = join(self.cfg.checkpoint.run_dir, "row_index")
        timeout_s = self.cfg.parallel.collective_timeout_s
        share_row_index(config, self.storage, shared, state=state, collective_timeout_s=timeout_s)
        return ClipLoader(
            config,
            rank=self.env.rank,
            world_size=self.env.world_size,
            storage=self.storage,
            state=state,
            build_index=False,
            shared_index=shared,
        )

    # ---- state -------------------------------------------------------------------------------------
    def _parts(self, step: int, data: dict[str, Any]) -> dict[str, Any]:
        return {
            "model": ModelOptimizerState(self.model, self.optimizer),
            "ema": self.ema,
            "scheduler": self.scheduler,
            "train": {"step": step, "seed": self.cfg.train.seed},
            "data": data,
        }

    def _restore(self) -> int | None:
        """The latest complete checkpoint of the run directory, else `stage.init_from`; builds the loader
        at the position the checkpoint recorded (or at the start)."""
        parts = self._parts(0, data={})
        resume = check_resume(self.cfg, self.storage, self.checkpointer)  # or refuse, before any write
        step = self.checkpointer.load(parts)
        previous = parts["data"].pop("lineage", None) if step is not None else None
        init_from = self._init_from_source() if step is None else None
        self._carry_exclusion(previous if step is not None else self._lineage_of(init_from))
        if resume is not None:
            apply_train_settings(self.optimizer, self.scheduler, self.cfg.train)  # not the checkpoint's lr
            if self.env.is_main:
                print(*resume.lines(self.cfg.checkpoint.run_dir, self.env.world_size), sep="\n", flush=True)
        self.loader = self._build_loader(state=parts["data"] if step is not None else None)
        if step is None and self.cfg.stage.init_from:
            report = load_initial_weights(
                self.model, self.cfg.stage.init_from, self.storage, self.cfg.model.cache_dir
            )
            self.ema = EMA(self.model, self.cfg.train.ema_decay)  # the average starts from the loaded weights
            if self.env.is_main:
                print(f"init_from {self.cfg.stage.init_from}: {report.summary()}", flush=True)
        self.lineage = lineage.begin(
            previous,
            step=step or 0,
            loader=self.loader,
            world_size=self.env.world_size,
            accumulation=self.cfg.grad_accumulation,
            config_yaml=to_yaml(self.cfg),
            init_from=init_from,
            curation=lineage.curation_provenance(
                open_table(self.loader.cfg.table, self.storage, self.loader.table_version)
            ),
        )
        return step

    def _init_from_source(self) -> dict[str, Any] | None:
        """The checkpoint folder `stage.init_from` names (its lineage continues this one's), as rank 0 saw
        it; None for a fresh stage; no folder for diffusers weights."""
        uri = self.cfg.stage.init_from
        if not uri:
            return None

        def folder() -> str | None:
            try:
                return checkpoint_folder(uri, self.storage)
            except CheckpointError:  # a diffusers folder: weights without a training history here
                return None

        return {"uri": uri, "folder": decided_by_rank0(folder)}

    def _lineage_of(self, init_from: dict[str, Any] | None) -> dict[str, Any] | None:
        """The lineage of the checkpoint this stage starts from (None for diffusers weights, or a checkpoint
        of weights alone)."""
        folder = (init_from or {}).get("folder")
        if folder is None:
            return None
        return decided_by_rank0(
            lambda: read_part(folder, "data", self.storage, missing_ok=True).get("lineage")
        )

    def _carry_exclusion(self, earlier: dict[str, Any] | None) -> None:
        if self.exclude or (carried := lineage.exclusion_in_force(earlier)) is None:
            return
        self.exclude = carried
        if self.env.is_main:
            print(
                f"data.exclude={carried}: still in force (the run's lineage); name another list to change it"
            )

    # ---- loop --------------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        cfg = self.cfg
        resumed = self._restore()
        if self.env.is_main:  # after the resume's checks and loads: a refused resume leaves it as it was
            self.files.write("config.yaml", to_yaml(cfg))
        step = resumed or 0
        result = TrainResult(steps=step, resumed_from=resumed)
        server = self._start_metrics()
        if self.metrics:
            self.metrics.observe_start(self.env.world_size, cfg.checkpoint.every, checkpoint_step=resumed)
        if self.env.is_main:
            self.tracker = Tracker.for_run(cfg, self.files, self.loader.table_version, self.metrics)
        if self.tracker:
            self.tracker.log(Record("config", step))
        batches = iter(self.loader)
        try:
            while step < cfg.steps:
                with self.profiler.step(step + 1):
                    started = time.perf_counter()
                    outcome = self._step(batches)
                    step += 1
                    self._record(step, outcome, time.perf_counter() - started, result)
                    if outcome.stop or step % cfg.checkpoint.every == 0 or step == cfg.steps:
                        result.checkpoint_blocked_seconds.append(self._save(step))
                    if outcome.stop:
                        result.stopped = True
                        break
                    self._validate_and_preview(step, result)
                    result.loop_seconds.append(time.perf_counter() - started)
            result.steps = step
            if cfg.stage.trainable == "lora" and not result.stopped:
                self._save_lora()
            result.peak_memory_bytes = peak_memory(self.device)
            result.flops_per_sample, result.peak_flops = self.flops, self.peak_flops
        except torch.OutOfMemoryError:
            self.profiler.memory_snapshot(f"oom-step-{step + 1}")
            raise
        finally:
            self.profiler.close()
            if self.tracker:
                self.tracker.close()
            self.checkpointer.close()
            if server is not None:
                server.close()
        return result

    def _step(self, batches: Iterator[dict[str, Any]]) -> StepOutcome:
        """One optimizer step over `grad_accumulation` micro-batches. Whether any rank was asked to stop
        travels with the loss all-reduce, so every rank sees it at the same step."""
        accumulation, wait = self.cfg.grad_accumulation, 0.0
        total = torch.zeros((), device=self.device)
        samples_per_rank = accumulation * self.cfg.data.micro_batch
        for micro in range(accumulation):
            waited = time.perf_counter()
            batch = next(batches)
            wait += time.perf_counter() - waited
            if self.served:
                self.served(self.scheduler.last_epoch + 1, micro, batch)
            self.preview_batch = self.preview_batch or batch
            latents, cond, randoms = self.task.prepare(batch, self.cfg.train.seed)
            if hasattr(self.model, "set_requires_gradient_sync"):
                self.model.set_requires_gradient_sync(micro == accumulation - 1)  # reduce once per step
            per_video = weighted_denoising_error(self.model, latents, cond, randoms.sigma, randoms.eps)
            (per_video.sum() / samples_per_rank).backward()
            total += per_video.detach().sum()
        grad_norm = self._clip_gradients()
        applied = math.isfinite(grad_norm)  # global: every rank computed the same norm
        self.checkpointer.wait_for_staging()  # a save in flight copies the weights and the EMA changed here
        if applied:
            self.optimizer.step()
            self.ema.update(self.model)
        with warnings.catch_warnings():  # PyTorch warns when a schedule moves on without an optimizer step
            warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)`", UserWarning)
            self.scheduler.step()  # the schedule follows the step count, applied or not
        self.optimizer.zero_grad(set_to_none=True)
        reduced = torch.stack([total, torch.tensor(float(self.stop.is_set()), device=self.device)])
        dist.all_reduce(reduced)
        loss = float(reduced[0]) / self.cfg.train.global_batch
        return StepOutcome(loss, grad_norm, wait, bool(reduced[1] > 0), applied)

    def _clip_gradients(self) -> float:
        params = [p for p in self.model.parameters() if p.requires_grad]
        limit = self.cfg.train.grad_clip or float("inf")
        norm = clip_gradients(params, limit)
        return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)

    def _record(self, step: int, outcome: StepOutcome, seconds: float, result: TrainResult) -> None:
        """The step's numbers to the result, the metrics and the progress line; a run of non-finite steps
        longer than the limit ends here (every rank decides alike: the norm is global)."""
        result.losses.append(outcome.loss)
        result.step_seconds.append(seconds)
        result.data_wait_seconds.append(outcome.data_wait)
        lr = self.scheduler.get_last_lr()[0]
        if self.metrics:
            local = self.cfg.grad_accumulation * self.cfg.data.micro_batch
            self.metrics.observe_step(
                step, outcome.loss, outcome.grad_norm, lr, seconds, outcome.data_wait, local
            )
            self.metrics.observe_skipped(self.loader.skipped)
        self.profiler.observe(seconds, outcome.data_wait)
        if self.progress:
            self.progress.update(step, outcome.loss, self.cfg.train.global_batch, seconds, outcome.data_wait)
        if self.tracker and (step % self.cfg.train.log_every == 0 or step == self.cfg.steps):
            self.tracker.log(Record("train", step, self._train_scalars(outcome, lr, seconds)))
        if outcome.applied:
            self.nonfinite_in_row = 0
            return
        self.nonfinite_in_row += 1
        result.nonfinite_steps.append(step)
        if self.metrics:
            self.metrics.observe_nonfinite_step()
        limit = self.cfg.train.nonfinite_steps_limit
        if self.env.is_main:
            print(
                f"step {step} skipped: loss {outcome.loss:.4g}, gradient norm {outcome.grad_norm:.4g} "
                f"({self.nonfinite_in_row} in a row; train.nonfinite_steps_limit={limit})",
                flush=True,
            )
        if self.nonfinite_in_row >= limit:
            raise NonFiniteError(
                f"training stopped at step {step}: {limit} steps in a row had a non-finite loss or gradient "
                f"norm (train.nonfinite_steps_limit={limit}); the weights are those of step "
                f"{step - limit}, the latest checkpoint in {self.cfg.checkpoint.run_dir} holds finite ones"
            )

    def _train_scalars(self, outcome: StepOutcome, lr: float, seconds: float) -> dict[str, float]:
        """The step's numbers as the progress line and Prometheus have them, for the experiment trackers."""
        samples_per_s = self.cfg.train.global_batch / seconds
        scalars = {
            "loss": outcome.loss,
            "grad_norm": outcome.grad_norm,
            "lr": lr,
            "samples_per_s": samples_per_s,
            "data_wait_s": outcome.data_wait,
            "skipped_samples": float(sum(self.loader.skipped.values())),
        }
        if self.flops and self.peak_flops:  # per device: the global rate shared by the ranks
            scalars["mfu"] = self.flops * samples_per_s / self.env.world_size / self.peak_flops
        return scalars

    def _validate_and_preview(self, step: int, result: TrainResult) -> None:
        every_val, every_preview = self.cfg.train.val_every, self.cfg.train.preview_every
        validate, preview = every_val and step % every_val == 0, every_preview and step % every_preview == 0
        if validate or preview:
            self.owner.confirm()
            self.checkpointer.wait_for_staging()  # swapping the EMA in changes the weights a save may copy
        if validate and (losses := self.validator(self.model, self.ema, step)):
            result.validation.append(losses)
            if self.tracker:
                self.tracker.log(Record("validation", step, losses))
        if preview:
            gif = self.previewer(self.model, self.ema, step, self.preview_batch)
            if self.tracker and gif:
                self.tracker.log(Record("preview", step, video=gif))

    def _save(self, step: int) -> float:
        """Checkpoint `step`; returns the seconds the loop was held (async: until the copy is under way)."""
        self._check_finite_weights(step)
        self.owner.confirm()
        committed = self.metrics.observe_checkpoint_committed if self.metrics else None
        replaced = [None] * self.env.world_size
        dist.all_gather_object(replaced, self.loader.take_replaced())  # per rank: what its workers decoded
        self.lineage = lineage.with_replaced(self.lineage, [r for rank in replaced for r in rank])
        data = self.loader.state_dict() | {"lineage": self.lineage}
        try:
            blocked = self.checkpointer.save(step, self._parts(step, data), committed)
        except CheckpointError:
            if self.metrics:
                self.metrics.observe_checkpoint_failure()
            raise
        if self.metrics:
            self.metrics.observe_checkpoint(blocked)
        return blocked

    def _check_finite_weights(self, step: int) -> None:
        """Refuse to save weights (or their average) with a NaN or an infinity: the latest checkpoint, and
        those `checkpoint.keep` keeps, stay finite. Each rank checks its shards; all agree on the answer."""
        tensors = [p.detach() for p in self.model.parameters()] + list(self.ema.shadow.values())
        local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
        finite = torch.stack([t.isfinite().all() for t in local if t.numel()]).all().float()
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not finite:
            raise NonFiniteError(
                f"the weights are not finite after step {step}: not saved; the latest checkpoint in "
                f"{self.cfg.checkpoint.run_dir} is the last finite one (lower train.lr, or check the data)"
            )

    # ---- metrics -----------------------------------------------------------------------------------
    def _start_metrics(self):
        m = self.cfg.metrics
        if m.port == 0:
            return None
        from svd.train.metrics import PEAK_FLOPS

        config = MetricsConfig(
            port=m.port,
            progress_every=self.cfg.train.log_every,
            gpu=m.gpu,
            peak_flops=dict(PEAK_FLOPS) | dict(m.gpu_peak_flops),
        )
        self.peak_flops = config.device_peak_flops(self.device)
        self.flops = self._flops_per_sample() if self.peak_flops else None
        self.metrics = TrainMetrics(
            config,
            job=self.cfg.job_name,
            stage=self.cfg.stage.name,
            rank=self.env.rank,
            node=socket.gethostname(),
            device=self.device,
            flops_per_sample=self.flops,
        )
        return serve_node_metrics(m.port, self.metrics.directory) if self.env.local_rank == 0 else None

    def _flops_per_sample(self) -> float:
        """FLOPs of one sample's forward and backward, counted on the real model (every rank runs it)."""
        batch = next(iter(self._build_loader(state=None, validation=False)))
        latents, cond, randoms = self.task.prepare(batch, self.cfg.train.seed)

        def forward_backward() -> None:
            weighted_denoising_error(self.model, latents, cond, randoms.sigma, randoms.eps).sum().backward()

        flops = flops_per_sample(forward_backward, samples=latents.shape[0])
        self.optimizer.zero_grad(set_to_none=True)
        return flops

    # ---- LoRA --------------------------------------------------------------------------------------
    def _save_lora(self) -> None:
        """The camera LoRA on its own: the EMA of the adapters, `<run_dir>/lora.safetensors` (what
        `jobs/export.py format=lora` writes too), small enough to ship beside the base model."""
        from safetensors.torch import save

        weights = {
            name.removeprefix("network."): (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu()
            for name, v in self.ema.shadow.items()
        }
        if self.env.is_main:
            self.files.write(
                "lora.safetensors", save(weights, metadata={"svd.run": self.cfg.checkpoint.run_dir})
            )


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run(cfg: RunConfig, stop: StopRequest | None = None) -> TrainResult:
    """The entry point of every rank, whatever launched it: joins the process group from the environment,
    trains (until `stop` is set, if given), leaves the group."""
    env = init_distributed(cfg.parallel.collective_timeout_s)
    try:
        with hold_run_dir(cfg) as owner:  # one run per run directory, taken before anything is written
            return Trainer(cfg, env, stop=stop, owner=owner).fit()
    finally:
        dist.destroy_process_group()
