"""The evaluation of one checkpoint of a run under one protocol, preemptible and independent of the
number of processes:

    <run>/eval/<protocol>/step-00001000/
        shards/shard-00003.npz     what one shard of conditions gave (samples' scores and features)
        videos/000017-m127.mp4      condition 17 sampled at motion bucket 127
        samples.lance               one row per sample: condition, seed, video, scores
        metrics.json                the protocol's numbers, intervals, counts, feature network, versions
        report.md

Each process takes the shards k with k mod world = rank (RANK and WORLD_SIZE, as every launcher sets
them) and skips the shards already written, so a rerun after a preemption finishes only the rest; a shard
is written whole, after its videos. Whichever process finds every shard written merges them: statistics
are sums (`FeatureStats`), merged exactly, so the result does not depend on the world size or the order.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from svd.config import METRICS_PORT, ConfigError
from svd.data.storage import Storage, join, write_whole
from svd.data.video_io import encode_mp4
from svd.eval.adherence import motion_score, spearman
from svd.eval.clip import SKIPPED as CLIP_SKIPPED
from svd.eval.clip import clip_similarities, load_clip
from svd.eval.compare import evaluated_in
from svd.eval.conditions import HeldOutConditions, Shard, conditions_of, shards
from svd.eval.features import FeatureNetwork
from svd.eval.frechet import FeatureStats, bootstrap_interval, distance_by_count, frechet_distance
from svd.eval.generate import VideoSampler, condition_seed
from svd.eval.lpips import MIN_SIDE as LPIPS_MIN_SIDE
from svd.eval.lpips import SKIPPED as LPIPS_SKIPPED
from svd.eval.lpips import Lpips
from svd.eval.protocol import EvalProtocol, check_fits
from svd.eval.quality import psnr, ssim
from svd.eval.report import CONTACT_SHEET_CONDITIONS, contact_sheet, line_plot, report, thumbnail
from svd.eval.tracking import track_evaluation
from svd.train.checkpoint import MARKER
from svd.train.stop import StopRequest
from svd.train.trained import RunError, committed_steps, read_run_config, trained_denoiser
from svd.version import code_version

if TYPE_CHECKING:
    from svd.curate.aesthetics import ClipScorer

HELD_OUT = ("run", "table")


@dataclass
class EvaluateSettings:
    run: str = ""  # the run directory (any URI)
    checkpoint: str = "latest"  # latest, or a step number
    out: str = ""  # where results go; default <run>/eval/<protocol name>
    watch: bool = False  # evaluate each checkpoint as it lands, until the run's last step (svd/eval/watch.py)
    poll_s: float = 60.0  # watch: seconds between looks for new checkpoints
    metrics_port: int = METRICS_PORT  # watch: Prometheus endpoint (or the next free port); 0: none
    compare: str = ""  # run,run,…: print and plot the protocol's evaluations of these runs instead
    # Held-out conditions: run (the run's held-out clips, its data.filter applied) or table (every held-out
    # clip of the table: what an ablation needs, so that models trained on different filters are sampled on
    # the same conditions)
    held_out: str = "run"
    # where the processes run (svd/launch/evaluation.py): local (this one, or as many as torchrun or srun
    # started: RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS), slurm (one job of nodes × ranks_per_node
    # tasks) or ray (as many Ray tasks)
    launcher: str = "local"
    nodes: int = 1  # slurm, ray
    ranks_per_node: int = 1  # slurm, ray: processes per node (one GPU each where the cluster has GPUs)
    cluster: str = "default"  # slurm, ray: the site settings of jobs/conf/cluster/<name>.yaml
    cpus_per_rank: int = 0  # slurm, ray: 0 takes the cluster's cpus_per_task
    folder: str = "outputs/launch/evaluate"  # slurm: submitit's logs and pickles
    wait: bool = True  # slurm: stay until the job ends and report its result (ray always waits)
    ray_address: str = ""  # ray: the cluster; empty: $RAY_ADDRESS, else a local Ray on this host

    @property
    def ranks(self) -> int:
        return self.nodes * self.ranks_per_node


class Evaluation:
    """One run under one protocol, in this process's share: `step()` to choose the checkpoint, `plan(step)`
    to see the shards, `evaluate(step)` to sample, measure and (last process) merge."""

    def __init__(
        self,
        settings: EvaluateSettings,
        protocol: EvalProtocol,
        storage: Storage,
        *,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | None = None,
    ):
        self.settings, self.protocol, self.storage = settings, protocol, storage
        self.rank, self.world_size = rank, world_size
        self.device = device or torch.device("cpu")
        if settings.held_out not in HELD_OUT:
            raise ConfigError(f"held_out={settings.held_out!r}: choose one of {list(HELD_OUT)}")
        self.run_config = read_run_config(settings.run, storage)
        if settings.held_out == "table":  # the filter only chooses the conditions here, never the model
            self.run_config = replace(self.run_config, data=replace(self.run_config.data, filter=None))
        check_fits(protocol, self.run_config.stage.task, run=settings.run)
        self.out = settings.out or join(settings.run, "eval", protocol.name)
        self._skipped: set[int] = set()

    def step(self) -> int:
        """The checkpoint step to evaluate: the one named, or the latest the run's marker names."""
        if self.settings.checkpoint != "latest":
            try:
                return int(self.settings.checkpoint)
            except ValueError:
                raise RunError(
                    f"checkpoint={self.settings.checkpoint!r}: give latest or a step number"
                ) from None
        committed = committed_steps(self.settings.run, self.storage)  # up to the step the marker names
        if not committed:
            raise RunError(f"run={self.settings.run}: no checkpoint yet (no checkpoints/{MARKER})")
        return committed[-1]

    def folder(self, step: int) -> str:
        return join(self.out, f"step-{step:08d}")

    def plan(self, step: int) -> tuple[list[Shard], list[Shard]]:
        """(every shard, this process's shards not written yet)."""
        every = shards(self.protocol)
        written = self._written(step)
        return every, [s for s in every if s.index % self.world_size == self.rank and s not in written]

    def done(self, step: int) -> bool:
        """Whether `step` has its metrics (or was skipped: its checkpoint was pruned before its turn)."""
        return self.evaluated(step) or step in self._skipped

    def evaluated(self, step: int) -> bool:
        """Whether `step` has its merged metrics (by this process or another)."""
        return self._exists(join(self.folder(step), "metrics.json"))

    def metrics(self, step: int) -> dict[str, Any]:
        """The merged metrics of `step` (its metrics.json)."""
        return json.loads(self._read(join(self.folder(step), "metrics.json")))

    def skip(self, step: int) -> None:
        self._skipped.add(step)

    def evaluate(
        self, step: int, *, progress: bool = True, stop: StopRequest | None = None
    ) -> dict[str, Any] | None:
        """Sample and measure this process's missing shards (until `stop` is set: the shard under way is
        finished); merge when every shard is written. Returns the metrics when this process merged them."""
        if step not in committed_steps(self.settings.run, self.storage):
            raise RunError(f"checkpoint={step}: not a saved step of {self.settings.run}")
        self._claim_folder(step)
        every, todo = self.plan(step)
        if todo:
            model = trained_denoiser(self.settings.run, self.run_config, step, self.storage)
            sampler = VideoSampler(self.run_config, model, self.protocol, self.device)
            conditions = conditions_of(self.run_config, self.protocol, self.storage)
            network = self._feature_network()
            clip = load_clip(self.protocol.clip) if self.protocol.clip else None
            lpips = self._lpips_scorer()
            for shard in tqdm(todo, desc=f"eval {self.protocol.name} step {step}", disable=not progress):
                if stop is not None and stop.is_set():
                    return None
                self._evaluate_shard(step, shard, conditions, sampler, network, clip, lpips)
        if self._written(step) == set(every):
            metrics = self.merge(step, every)
            track_evaluation(self.run_config, self.settings.run, self.out, self.storage, metrics)
            return metrics
        return None

    def _claim_folder(self, step: int) -> None:
        """The step folder holds one protocol configuration's results: its settings are written there first,
        and shards made with other settings are never merged with these (a rerun of a changed command
        would otherwise skip the shards it finds and report a mixture)."""
        uri = join(self.folder(step), "protocol.json")
        mine = asdict(self.protocol)
        if not self._exists(uri):
            self._write(uri, json.dumps(mine, indent=2, sort_keys=True).encode())
            return
        theirs = asdict(EvalProtocol()) | json.loads(self._read(uri))  # settings added since: defaults
        changed = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
        if changed:
            shown = ", ".join(f"eval.{k}={theirs.get(k)!r} there, {mine.get(k)!r} now" for k in changed[:3])
            raise ConfigError(
                f"{self.folder(step)} holds results of other settings ({shown}): "
                "give another out=, or remove that folder"
            )

    def _lpips_scorer(self) -> Lpips | None:
        p = self.protocol
        if p.metric != "interpolation" or not p.lpips:
            return None
        side = min(p.height or self.run_config.data.height, p.width or self.run_config.data.width)
        if side < LPIPS_MIN_SIDE:
            raise ConfigError(
                f"eval.lpips: LPIPS's AlexNet needs frames of at least {LPIPS_MIN_SIDE} px a side, "
                f"these have {side} (set eval.height and eval.width)"
            )
        return Lpips.load(p.lpips, sha256=p.lpips_sha256)

    def _feature_network(self) -> FeatureNetwork | None:
        p = self.protocol
        if p.metric != "fvd":
            return None
        return FeatureNetwork.load(
            p.feature_network,
            sha256=p.feature_sha256,
            cache_dir=self.run_config.model.cache_dir,
            storage=self.storage,
            device=self.device,
            size=p.feature_size,
        )

    def _evaluate_shard(
        self,
        step: int,
        shard: Shard,
        conditions: HeldOutConditions,
        sampler: VideoSampler,
        network: FeatureNetwork | None,
        clip: ClipScorer | None,
        lpips: Lpips | None,
    ) -> None:
        p = self.protocol
        batch = conditions.batch(shard)
        truth = batch["frames"].permute(0, 1, 3, 4, 2).numpy()  # (B, T, H, W, 3) uint8
        numbers = range(shard.first, shard.first + shard.count)
        buckets = p.motion_buckets if p.metric == "motion_adherence" else p.motion_buckets[:1]
        rows, generated, thumbs = [], [], []
        for bucket in buckets:
            seeds = [condition_seed(p, i, bucket) for i in numbers]
            videos = sampler(batch, seeds, bucket)
            for j, (number, seed, video) in enumerate(zip(numbers, seeds, videos, strict=True)):
                name = f"videos/{number:06d}-m{bucket:03d}.mp4"
                self._write(join(self.folder(step), name), encode_mp4(video, p.fps))
                row = {
                    "condition": number,
                    "motion_bucket_id": bucket,
                    "seed": seed,
                    "clip_id": batch["clip_id"][j],
                    "caption": batch["caption"][j],
                    "video": name,
                }
                rows.append(
                    row | self._scores(video, truth[j], lpips) | self._clip_scores(clip, video, truth[j], row)
                )
            if network is not None:
                generated.append(network(videos))
            if bucket == buckets[0]:
                shown = [j for j, n in enumerate(numbers) if n < CONTACT_SHEET_CONDITIONS]
                thumbs += [(thumbnail(videos[j]), thumbnail(truth[j])) for j in shown]
        arrays: dict[str, Any] = {"rows": np.array(json.dumps(rows))}
        if thumbs:
            arrays["sample_thumbnails"] = np.stack([t[0] for t in thumbs])
            arrays["reference_thumbnails"] = np.stack([t[1] for t in thumbs])
        if network is not None:
            arrays["generated"] = np.concatenate(generated)
            arrays["reference"] = network(truth)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        self._write(self._shard_uri(step, shard), buffer.getvalue())  # last: the shard is done

    def _scores(self, video: np.ndarray, truth: np.ndarray, lpips: Lpips | None) -> dict[str, float]:
        p = self.protocol
        if p.metric == "motion_adherence":
            return {"motion_score": motion_score(video, p.fps)}
        if p.metric == "interpolation":  # the frames between the two given ones
            generated = video[1:-1].transpose(0, 3, 1, 2) / 255.0
            true = truth[1:-1].transpose(0, 3, 1, 2) / 255.0
            scores = {"psnr": psnr(generated, true), "ssim": ssim(generated, true)}
            return scores | ({"lpips": lpips(generated, true)} if lpips else {})
        return {}

    def _clip_scores(
        self, clip: ClipScorer | None, video: np.ndarray, truth: np.ndarray, row: dict[str, Any]
    ) -> dict[str, float]:
        """Frames to the prompt, and to the conditioning image (the held-out clip's first frame) of an
        image-to-video model."""
        if clip is None:
            return {}
        image = truth[0] if self.run_config.stage.task == "image_to_video" else None
        return clip_similarities(clip, video, caption=row["caption"], image=image)

    def merge(self, step: int, every: list[Shard]) -> dict[str, Any]:
        """Every shard's results into samples.lance, metrics.json and report.md (idempotent, and safe when
        several processes merge at once)."""
        p = self.protocol
        rows, generated, reference, samples_shown, references_shown = [], [], [], [], []
        for shard in every:
            with np.load(io.BytesIO(self._read(self._shard_uri(step, shard)))) as f:
                rows += json.loads(str(f["rows"]))
                if "generated" in f:
                    generated.append(f["generated"])
                    reference.append(f["reference"])
                if "sample_thumbnails" in f:
                    samples_shown += list(f["sample_thumbnails"])
                    references_shown += list(f["reference_thumbnails"])
        rows.sort(key=lambda r: (r["motion_bucket_id"], r["condition"]))
        values: dict[str, Any] = {}
        if p.metric == "fvd":
            features, references = np.concatenate(generated), np.concatenate(reference)
            ref_stats = FeatureStats.of(references)
            values["fvd"] = frechet_distance(FeatureStats.of(features), ref_stats)
            values["fvd_interval_95"] = list(
                bootstrap_interval(features, ref_stats, draws=p.bootstrap_draws, seed=p.seed)
            )
            counts = [n for n in p.counts if n <= len(features)]
            values["fvd_by_count"] = [[n, d] for n, d in distance_by_count(features, ref_stats, counts)]
        elif p.metric == "motion_adherence":
            asked = np.array([r["motion_bucket_id"] for r in rows], dtype=np.float64)
            measured = np.array([r["motion_score"] for r in rows])
            values["spearman_rho"] = spearman(asked, measured)
            values["motion_by_bucket"] = {
                str(b): float(measured[asked == b].mean()) for b in sorted(set(p.motion_buckets))
            }
        else:
            values["psnr"] = float(np.mean([r["psnr"] for r in rows]))
            values["ssim"] = float(np.mean([r["ssim"] for r in rows]))
            if p.lpips:
                values["lpips"] = float(np.mean([r["lpips"] for r in rows]))
        for name in ("clip_text", "clip_image"):
            scored = [r[name] for r in rows if name in r]
            if scored:
                values[f"{name}_similarity"] = float(np.mean(scored))
        metrics = {
            "protocol": p.name,
            "metric": p.metric,
            "run": self.settings.run,
            "step": step,
            "samples": len(rows),
            "conditions": p.samples,
            "values": values,
            "feature_network": {"uri": p.feature_network, "sha256": p.feature_sha256}
            if p.metric == "fvd"
            else None,
            "settings": {k: v for k, v in vars(p).items() if k not in ("name", "metric")},
            "skipped": skipped(p),
            "code_version": code_version(),
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        folder = self.folder(step)
        self._write_samples(join(folder, "samples.lance"), rows)
        self._write(join(folder, "metrics.json"), json.dumps(metrics, indent=2).encode())
        pictures = []
        if samples_shown:
            self._write(join(folder, "contact_sheet.png"), contact_sheet(samples_shown, references_shown))
            pictures.append(("Samples (top) and references (bottom), middle frames", "contact_sheet.png"))
        if values.get("fvd_by_count"):
            curve = {"FVD": [tuple(point) for point in values["fvd_by_count"]]}
            self._write(join(folder, "fvd_by_count.png"), line_plot(curve, "FVD by sample count", "samples"))
            pictures.append(("FVD against the number of samples", "fvd_by_count.png"))
        for name, points in self._by_step(step, values).items():
            self._write(join(folder, f"{name}_by_step.png"), line_plot({name: points}, name, "step"))
            pictures.append((f"{name} at every evaluated step", f"{name}_by_step.png"))
        self._write(join(folder, "report.md"), report(metrics, pictures).encode())
        return metrics

    def _write_samples(self, uri: str, rows: list[dict[str, Any]]) -> None:
        """samples.lance, safe when two processes merge at once (the last two ranks can both find every shard
        written): they merge the same shards into the same rows, so a commit that another merge won (Lance:
        "Dataset already exists", or a conflicting overwrite) leaves the table as this one would have written
        it, which is checked, not assumed."""
        import lance

        table = pa.Table.from_pylist(rows)
        options = self.storage.lance_options(uri)
        try:
            lance.write_dataset(table, uri, mode="overwrite", storage_options=options)
        except Exception:  # whatever Lance raises for a lost commit: re-raised unless the table is these rows
            try:
                written = lance.dataset(uri, storage_options=options).to_table()
            except Exception:  # no table to compare (the error was not a lost commit)
                written = None
            if written is None or written.to_pylist() != table.to_pylist():
                raise

    def _by_step(self, step: int, values: dict[str, Any]) -> dict[str, list[tuple[float, float]]]:
        """Each scalar metric at every step evaluated so far into this folder, this one included."""
        by_step = {m["step"]: m["values"] for m in evaluated_in(self.out, self.storage)} | {step: values}
        names = [k for k, v in values.items() if isinstance(v, float)]
        return {n: [(s, v[n]) for s, v in by_step.items() if isinstance(v.get(n), float)] for n in names}

    def _shard_uri(self, step: int, shard: Shard) -> str:
        return join(self.folder(step), "shards", f"shard-{shard.index:05d}.npz")

    def _written(self, step: int) -> set[Shard]:
        """The shards whose results are written: one listing of the shards folder, not a request per shard."""
        fs, path = self.storage.fsspec(join(self.folder(step), "shards"))
        fs.invalidate_cache(path)
        names = {name.rsplit("/", 1)[-1] for name in fs.ls(path, detail=False)} if fs.exists(path) else set()
        return {s for s in shards(self.protocol) if self._shard_uri(step, s).rsplit("/", 1)[-1] in names}

    def _exists(self, uri: str) -> bool:
        fs, path = self.storage.fsspec(uri)
        fs.invalidate_cache(path.rsplit("/", 1)[0])
        return fs.exists(path)

    def _write(self, uri: str, data: bytes) -> None:
        fs, path = self.storage.fsspec(uri)
        write_whole(fs, path, data)

    def _read(self, uri: str) -> bytes:
        fs, path = self.storage.fsspec(uri)
        return fs.cat_file(path)


def rank_and_world(env: dict[str, str] | None = None) -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's variables: torch's (RANK, WORLD_SIZE, LOCAL_RANK),
    else Slurm's (`srun -n 8 python jobs/evaluate.py …`: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID), else one
    process. The evaluation needs no process group: only which shards are this process's."""
    env = os.environ if env is None else env
    for rank, world, local in (
        ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
        ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
    ):
        if rank in env and world in env:
            return int(env[rank]), int(env[world]), int(env.get(local, 0))
    return 0, 1, 0


def skipped(p: EvalProtocol) -> list[str]:
    """A line for each metric of the protocol left out for want of weights."""
    lines = [] if p.clip else [CLIP_SKIPPED]
    return lines + ([LPIPS_SKIPPED] if p.metric == "interpolation" and not p.lpips else [])
