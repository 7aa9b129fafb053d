"""The training loop of every stage, identical on one CPU process and on 32 GPU nodes.

    Trainer(cfg, env).fit()     # build → restore (or init_from) → loop → save

Build: the UNet for the stage's task (on `meta` for large models, materialised after sharding), LoRA or
frozen temporal layers where the stage says so, FSDP2 via `parallel.parallelize`, AdamW, the EMA, the
frozen encoders (`task.Task`), the clip loader for this rank. Restore: the latest complete checkpoint of
the run directory, else the weights of `stage.init_from`. Loop: `grad_accumulation` micro-batches per
optimizer step, gradient clipping, EMA update, metrics and a progress line, checkpoints, validation at
fixed noise levels and preview videos sampled with the EMA weights.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from svd.config import RunConfig, to_yaml
from svd.data.buckets import Bucket
from svd.data.loader import ClipLoader, LoaderConfig, open_table
from svd.data.storage import Storage, join
from svd.diffusion.edm import Denoiser, weighted_denoising_error
from svd.model.video_unet import VideoUNet
from svd.train import parallel
from svd.train.checkpoint import Checkpointer, CheckpointError, ModelOptimizerState
from svd.train.ema import EMA
from svd.train.metrics import MetricsConfig, ProgressLine, TrainMetrics, flops_per_sample, serve_node_metrics
from svd.train.optim import build_optimizer, build_scheduler
from svd.train.parallel import DistEnv
from svd.train.stop import StopRequest
from svd.train.task import CONDITIONED_ON_IMAGE, SampleRandoms, Task, unet_config
from svd.train.weights import initial_weights, load_initial_weights

META_INIT_PARAMS = 100_000_000  # parallel.init_device=auto: build on `meta` above this many parameters


@dataclass
class TrainResult:
    steps: int  # optimizer steps completed in the run directory (including earlier runs)
    resumed_from: int | None
    losses: list[float] = field(default_factory=list)  # global mean loss per step of this process's run
    step_seconds: list[float] = field(default_factory=list)
    data_wait_seconds: list[float] = field(default_factory=list)  # of each step, waiting for batches
    peak_memory_bytes: int = 0  # of the device (CUDA), else of the process (max RSS)
    flops_per_sample: float | None = None  # forward + backward, counted when MFU is reported
    peak_flops: float | None = None  # of the device, from the metrics table
    validation: list[dict[str, float]] = field(default_factory=list)
    stopped: bool = False  # a stop request ended the run early, after a checkpoint of its last step


class Trainer:
    def __init__(
        self, cfg: RunConfig, env: DistEnv, storage: Storage | None = None, stop: StopRequest | None = None
    ):
        self.cfg, self.env = cfg, env
        self.stop = stop or StopRequest()
        self.storage = storage or Storage.from_env()
        self.device = env.device
        self.task = Task.build(cfg, self.device)
        self.model = self._build_model()
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.scheduler = build_scheduler(self.optimizer, cfg.train, cfg.steps)
        self.ema = EMA(self.model, cfg.train.ema_decay)
        self.loader: ClipLoader | None = None  # built by `_restore`, at its checkpointed state
        self.checkpointer = Checkpointer(
            cfg.checkpoint.run_dir,
            self.storage,
            keep=cfg.checkpoint.keep,
            async_save=cfg.checkpoint.async_save,
        )
        self.metrics: TrainMetrics | None = None
        self.flops: float | None = None
        self.peak_flops: float | None = None
        self.preview_batch: dict[str, Any] | None = None
        self.progress = ProgressLine(cfg.steps, cfg.train.log_every) if env.is_main else None

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
        mesh = parallel.build_mesh(self.env, cfg.parallel.sharding)
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

    def _loader_config(self, *, validation: bool) -> LoaderConfig:
        d, cfg = self.cfg.data, self.cfg
        parts = [f"({d.filter})"] if d.filter else []
        parts.append(
            f"split = '{d.val_split}'" if validation else f"(split IS NULL OR split != '{d.val_split}')"
        )
        if cfg.stage.camera_motion and not validation:
            parts.append(f"camera_motion = '{cfg.stage.camera_motion}'")
        needs_pixels = cfg.stage.task in ("image_to_video", "multiview")
        return LoaderConfig(
            table=d.table,
            buckets=(Bucket(d.height, d.width, d.frames, d.micro_batch, fps=d.fps),),
            filter=" AND ".join(parts),
            version=int(d.version) if d.version and d.version.isdigit() else d.version,
            seed=cfg.train.seed,
            num_workers=0 if validation else d.num_workers,
            serve="frames" if needs_pixels else d.serve,
            motion_score_scale=d.motion_score_scale,
            caption_weights=tuple(d.caption_weights) if d.caption_weights else None,
            cache_dir=d.cache_dir,
            batch_timeout_s=d.batch_timeout_s,
        )

    def _build_loader(self, state: dict[str, Any] | None, *, validation: bool = False) -> ClipLoader:
        """Every rank reads the same table version (rank 0 resolves it: a curation commit may land while the
        ranks start); the node's first rank builds the row index, the others wait, then open it."""
        config = self._loader_config(validation=validation)
        if state is None:
            version = [
                open_table(config.table, self.storage, config.version).version if self.env.is_main else None
            ]
            dist.broadcast_object_list(version, src=0)
            config = dataclasses.replace(config, version=version[0])

        def make() -> ClipLoader:
            return ClipLoader(
                config, rank=self.env.rank, world_size=self.env.world_size, storage=self.storage, state=state
            )

        if self.env.local_rank == 0:
            loader = make()
            dist.barrier()
        else:
            dist.barrier()
            loader = make()
        return loader

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
        step = self.checkpointer.load(parts)
        self.loader = self._build_loader(state=parts["data"] if step is not None else None)
        if step is None and self.cfg.stage.init_from:
            weights = initial_weights(self.cfg.stage.init_from, self.storage, self.cfg.model.cache_dir)
            report = load_initial_weights(self.model, weights)
            self.ema = EMA(self.model, self.cfg.train.ema_decay)  # the average starts from the loaded weights
            if self.env.is_main:
                print(f"init_from {self.cfg.stage.init_from}: {report.summary()}", flush=True)
        return step

    # ---- loop --------------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        cfg, env = self.cfg, self.env
        if env.is_main:
            self._write_run_file("config.yaml", to_yaml(cfg))
        resumed = self._restore()
        step = resumed or 0
        result = TrainResult(steps=step, resumed_from=resumed)
        server = self._start_metrics()
        if self.metrics:
            self.metrics.observe_start(env.world_size, cfg.checkpoint.every, checkpoint_step=resumed)
        batches = iter(self.loader)
        try:
            while step < cfg.steps:
                started = time.perf_counter()
                loss, wait, stopping = self._step(batches)
                step += 1
                seconds = time.perf_counter() - started
                result.losses.append(loss)
                result.step_seconds.append(seconds)
                result.data_wait_seconds.append(wait)
                self._observe(step, loss, seconds, wait)
                if stopping or step % cfg.checkpoint.every == 0 or step == cfg.steps:
                    self._save(step)
                if stopping:
                    result.stopped = True
                    break
                if cfg.train.val_every and step % cfg.train.val_every == 0:
                    result.validation.append(self.validate(step))
                if cfg.train.preview_every and step % cfg.train.preview_every == 0:
                    self.preview(step)
            result.steps = step
            if cfg.stage.trainable == "lora" and not result.stopped:
                self._save_lora()
            result.peak_memory_bytes = peak_memory(self.device)
            result.flops_per_sample, result.peak_flops = self.flops, self.peak_flops
        finally:
            self.checkpointer.close()
            if server is not None:
                server.close()
        return result

    def _save(self, step: int) -> None:
        try:
            blocked = self.checkpointer.save(step, self._parts(step, self.loader.state_dict()))
        except CheckpointError:
            if self.metrics:
                self.metrics.observe_checkpoint_failure()
            raise
        if self.metrics:
            self.metrics.observe_checkpoint(blocked, step)

    def _step(self, batches) -> tuple[float, float, bool]:
        """One optimizer step; returns the global mean loss, the seconds spent waiting for batches and
        whether any rank was asked to stop (carried by the loss all-reduce, so all ranks agree)."""
        accumulation, wait = self.cfg.grad_accumulation, 0.0
        total = torch.zeros((), device=self.device)
        samples_per_rank = accumulation * self.cfg.data.micro_batch
        for micro in range(accumulation):
            waited = time.perf_counter()
            batch = next(batches)
            wait += time.perf_counter() - waited
            self.preview_batch = self.preview_batch or batch  # previews condition on the run's first sample
            latents, cond, randoms = self.task.prepare(batch, self.cfg.train.seed)
            if hasattr(self.model, "set_requires_gradient_sync"):
                self.model.set_requires_gradient_sync(micro == accumulation - 1)  # reduce once per step
            per_video = weighted_denoising_error(self.model, latents, cond, randoms.sigma, randoms.eps)
            (per_video.sum() / samples_per_rank).backward()
            total += per_video.detach().sum()
        self.last_grad_norm = self._clip_gradients()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.model)
        reduced = torch.stack([total, torch.tensor(float(self.stop.is_set()), device=self.device)])
        dist.all_reduce(reduced)
        return float(reduced[0]) / self.cfg.train.global_batch, wait, bool(reduced[1] > 0)

    def _clip_gradients(self) -> float:
        params = [p for p in self.model.parameters() if p.requires_grad]
        limit = self.cfg.train.grad_clip or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, limit, foreach=True)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

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

    def _observe(self, step: int, loss: float, seconds: float, wait: float) -> None:
        lr = self.scheduler.get_last_lr()[0]
        if self.metrics:
            local = self.cfg.grad_accumulation * self.cfg.data.micro_batch
            self.metrics.observe_step(step, loss, self.last_grad_norm, lr, seconds, wait, local)
            self.metrics.observe_skipped(self.loader.skipped)
        if self.progress:
            self.progress.update(step, loss, self.cfg.train.global_batch, seconds, wait)

    # ---- validation and previews -------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, step: int) -> dict[str, float]:
        """EMA-weight loss on the held-out split at fixed σ and fixed noise, comparable across runs."""
        try:
            loader = self._build_loader(state=None, validation=True)
        except ValueError as e:  # no held-out row: nothing to validate on
            if self.env.is_main:
                print(f"validation skipped: {e}", flush=True)
            self.cfg.train.val_every = 0
            return {}
        sigmas = self.cfg.train.val_sigmas
        sums = torch.zeros(len(sigmas) + 1, device=self.device)
        with self.ema.applied(self.model):
            per_step = self.env.world_size * self.cfg.data.micro_batch
            for _, batch in zip(range(-(-self.cfg.train.val_samples // per_step)), loader, strict=False):
                latents = self.task.latents(batch)
                randoms = self.task.draw(batch, tuple(latents.shape[1:]), self.cfg.train.seed + 1)
                randoms.dropped.zero_()
                cond = self.task.conditioning(batch, latents, randoms)
                for i, sigma in enumerate(sigmas):
                    fixed = torch.full_like(randoms.sigma, sigma)
                    sums[i] += weighted_denoising_error(self.model, latents, cond, fixed, randoms.eps).sum()
                sums[-1] += latents.shape[0]
        dist.all_reduce(sums)
        losses = {f"sigma_{s:g}": float(v) for s, v in zip(sigmas, sums[:-1] / sums[-1], strict=True)}
        losses["mean"] = sum(losses.values()) / len(sigmas)
        if self.env.is_main:
            self._append_run_file("validation.jsonl", json.dumps({"step": step, **losses}))
            print(
                f"validation at step {step}: loss {losses['mean']:.4f} (EMA weights, {len(sigmas)} σ)",
                flush=True,
            )
        return losses

    @torch.no_grad()
    def preview(self, step: int) -> None:
        """A video sampled with the EMA weights from the first training sample's conditioning. Every rank
        samples (the sharded forward is collective); rank 0 writes mp4 and gif to the run directory."""
        from svd.data.video_io import to_uint8_frames
        from svd.diffusion.sampling import EulerEDMSampler, SamplerConfig

        one = {k: (v[:1] if isinstance(v, Tensor | list) else v) for k, v in self.preview_batch.items()}
        latents = self.task.latents(one)
        lo, hi = self.cfg.train.preview_guidance
        cond, uncond = (
            self.task.conditioning(one, latents, self._preview_randoms(latents, one, dropped))
            for dropped in (False, True)
        )
        sampler = EulerEDMSampler(
            SamplerConfig(num_steps=self.cfg.train.preview_steps, guidance_min=lo, guidance_max=hi)
        )
        with self.ema.applied(self.model):
            sample = sampler.sample(
                self.model, tuple(latents.shape), cond, uncond, seed=self.cfg.train.seed, device=self.device
            )
        if self.env.is_main:
            video = to_uint8_frames(self.task.autoencoder.decode(sample)[0].cpu())
            self._write_preview(step, video)

    def _preview_randoms(self, latents: Tensor, batch: dict[str, Any], dropped: bool) -> SampleRandoms:
        """No dropout (or all, for the unconditional branch); the conditioning frame noised as the released
        sampling script does, at σ_aug = 0.02."""
        g = torch.Generator(self.device).manual_seed(self.cfg.train.seed)
        image_cond = "frames" in batch and self.cfg.stage.task in CONDITIONED_ON_IMAGE
        return SampleRandoms(
            dropped=torch.tensor([dropped], device=self.device),
            sigma=torch.ones(1, device=self.device),
            eps=torch.zeros_like(latents),
            cond_sigma=torch.full((1,), 0.02 if image_cond else 0.0, device=self.device),
            cond_noise=torch.randn(batch["frames"][:1, 0].shape, generator=g, device=self.device)
            if image_cond
            else None,
        )

    def _write_preview(self, step: int, video) -> None:
        import tempfile
        from pathlib import Path

        from svd.data.video_io import write_gif, write_mp4

        with tempfile.TemporaryDirectory() as tmp:
            for path in (
                write_mp4(video, Path(tmp) / f"step-{step:08d}.mp4", self.cfg.data.fps),
                write_gif(video, Path(tmp) / f"step-{step:08d}.gif", self.cfg.data.fps),
            ):
                fs, target = self.storage.fsspec(join(self.cfg.checkpoint.run_dir, "previews", path.name))
                fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
                fs.put_file(str(path), target)
        print(f"preview at step {step}: {join(self.cfg.checkpoint.run_dir, 'previews')}", flush=True)

    def _save_lora(self) -> None:
        """The camera LoRA on its own: the EMA of the adapters, `<run_dir>/lora.safetensors` (what
        `jobs/export.py format=lora` writes too), small enough to ship beside the base model."""
        from safetensors.torch import save
        from torch.distributed.tensor import DTensor

        weights = {
            name.removeprefix("network."): (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu()
            for name, v in self.ema.shadow.items()
        }
        if self.env.is_main:
            self._write_run_file(
                "lora.safetensors", save(weights, metadata={"svd.run": self.cfg.checkpoint.run_dir})
            )

    def _write_run_file(self, name: str, text: str | bytes) -> None:
        fs, path = self.storage.fsspec(join(self.cfg.checkpoint.run_dir, name))
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, text.encode() if isinstance(text, str) else text)

    def _append_run_file(self, name: str, line: str) -> None:
        fs, path = self.storage.fsspec(join(self.cfg.checkpoint.run_dir, name))
        old = fs.cat_file(path).decode() if fs.exists(path) else ""
        fs.pipe_file(path, (old + line + "\n").encode())


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run(cfg: RunConfig, stop: StopRequest | None = None) -> TrainResult:
    """The entry point of every rank, whatever launched it: joins the process group from the environment,
    trains (until `stop` is set, if given), leaves the group; no loader worker outlives it
    (`svd.train.processes`)."""
    from svd.train.processes import children_ended

    env = parallel.init_distributed(cfg.parallel.collective_timeout_s)
    try:
        with children_ended():
            return Trainer(cfg, env, stop=stop).fit()
    finally:
        dist.destroy_process_group()
