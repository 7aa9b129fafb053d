"""Raw videos → scored clips in a Lance table: the curation run.

Per video (in a pool of worker processes): probe → one decoding pass (thumbnails for cuts, 2 fps frames
for motion) → cut detection → clips → per clip: motion, first/middle/last frames → captions, CLIP
aesthetic and similarity scores, text area (→ optional latents). The main process appends finished clips
to the table every `commit_every` videos and records every video it finished — with its clips, or with
the reason it was rejected — in a log table beside it (`<table>.videos.lance`).

Resumable: a rerun skips videos found in either table, so a crash loses at most the uncommitted batch.
Shardable: `shard=i/n` takes the videos whose URI hashes to i mod n, so n processes (or a Slurm array)
curate disjoint parts into one table; Lance's commit protocol (conditional writes on object storage)
keeps concurrent appends from losing one another.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import lance
import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from svd.curate.aesthetics import ClipScorer
from svd.curate.captions import Captioner, ModelCaptioner, SidecarCaptioner
from svd.curate.config import CurateConfig
from svd.curate.cuts import CutConfig, clips_between, detect_transitions
from svd.curate.latents import encode_clip
from svd.curate.motion import measure_motion
from svd.curate.ocr import LearnedTextDetector, MorphologicalTextDetector, TextDetector, text_area
from svd.curate.probe import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, RejectionError, VideoInfo, probe
from svd.curate.scan import grab_frames, scan
from svd.data.storage import Storage, scheme
from svd.data.table import to_arrow
from svd.data.video import DecodeError
from svd.model.autoencoder import Autoencoder, AutoencoderConfig, build_autoencoder

MOTION_FPS = 2.0
MOTION_SIDE = 16

VIDEO_LOG = pa.schema(
    [
        pa.field("video_uri", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),  # "ok" or the reason it was rejected
        pa.field("clips", pa.int32()),
        pa.field("duration_s", pa.float64()),
        pa.field("fps", pa.float32()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("codec", pa.string()),
        pa.field("seconds", pa.float32()),  # processing time
        pa.field("detail", pa.string()),
    ]
)


def log_uri(table_uri: str) -> str:
    return table_uri.rstrip("/").removesuffix(".lance") + ".videos.lance"


def list_inputs(input_uri: str, storage: Storage) -> list[str]:
    """Every video and image under `input_uri`, as URIs, in a stable order."""
    fs, root = storage.fsspec(input_uri)
    prefix = f"{scheme(input_uri)}://" if "://" in input_uri else ""
    paths = [fs._strip_protocol(root)] if fs.isfile(root) else fs.find(root)
    media = [p for p in paths if p.lower().endswith(VIDEO_EXTENSIONS + IMAGE_EXTENSIONS)]
    return sorted(prefix + p for p in media)


def shard_of(uri: str, shards: int) -> int:
    """Stable across listings and machines: a hash of the URI, not its position in a list."""
    return int(hashlib.sha1(uri.encode()).hexdigest()[:12], 16) % shards


def clip_id(video_uri: str, index: int) -> str:
    return f"{hashlib.sha1(video_uri.encode()).hexdigest()[:16]}-{index:04d}"


def already_processed(table_uri: str, storage: Storage) -> set[str]:
    """Videos with clips in the table or a record in its log: a rerun skips them."""
    done: set[str] = set()
    for uri in (table_uri, log_uri(table_uri)):
        try:
            table = lance.dataset(uri, storage_options=storage.lance_options(uri))
        except (ValueError, OSError):
            continue  # not written yet
        done |= set(table.to_table(columns=["video_uri"]).column("video_uri").unique().to_pylist())
    return done


@dataclass
class Stages:
    """The models and detectors of the stages, built once per worker process."""

    cfg: CurateConfig
    storage: Storage
    cuts: CutConfig
    text: TextDetector
    captioners: list[Captioner]
    clip: ClipScorer | None = None
    autoencoder: Autoencoder | None = None

    @staticmethod
    def build(cfg: CurateConfig) -> Stages:
        storage = Storage.from_env()

        def local(uri: str | None) -> str | None:
            return storage.local_copy(uri, cfg.cache_dir) if uri else None

        captioners: list[Captioner] = [ModelCaptioner(local(cfg.captioner))] if cfg.captioner else []
        captioners.append(SidecarCaptioner(storage))
        return Stages(
            cfg=cfg,
            storage=storage,
            cuts=CutConfig(detector=cfg.cut_detector, min_clip_s=cfg.min_clip_s, max_clip_s=cfg.max_clip_s),
            text=LearnedTextDetector(local(cfg.text_detector))
            if cfg.text_detector
            else MorphologicalTextDetector(),
            captioners=captioners,
            clip=ClipScorer(local(cfg.clip_model), local(cfg.aesthetic_head)) if cfg.clip_model else None,
            autoencoder=build_autoencoder(
                AutoencoderConfig(kind=cfg.autoencoder, pretrained=local(cfg.autoencoder_path))
            )
            if cfg.latents
            else None,
        )

    def open(self, uri: str) -> str | BinaryIO:
        return self.storage.reader(uri, block_size=8 << 20)  # whole videos are read: larger requests


@dataclass
class VideoResult:
    rows: list[dict[str, Any]]
    log: dict[str, Any]


def curate_video(uri: str, stages: Stages) -> VideoResult:
    """All stages for one video (or image); never raises: failures become a log record with a reason."""
    start = time.perf_counter()
    info: VideoInfo | None = None
    try:
        info = probe(
            stages.open(uri), min_duration_s=stages.cfg.min_clip_s, max_duration_s=stages.cfg.max_video_s
        )
        rows = _image_rows(uri, info, stages) if info.is_image else _video_rows(uri, info, stages)
        status, detail = ("ok", "") if rows else ("no_clips", "no segment between cuts is long enough")
    except RejectionError as e:
        rows, status, detail = [], e.reason, str(e)
    except Exception as e:  # one bad video must not stop a run of millions: record it with its traceback
        rows, status = [], "error"
        detail = f"{type(e).__name__}: {e} | {traceback.format_exc(limit=3)!r}"
    log = {
        "video_uri": uri,
        "status": status,
        "clips": len(rows),
        "duration_s": info.duration_s if info else None,
        "fps": info.fps if info else None,
        "width": info.width if info else None,
        "height": info.height if info else None,
        "codec": info.codec if info else None,
        "seconds": time.perf_counter() - start,
        "detail": detail[:2000],
    }
    return VideoResult(rows, log)


def _video_rows(uri: str, info: VideoInfo, stages: Stages) -> list[dict[str, Any]]:
    result = scan(stages.open(uri), motion_fps=MOTION_FPS, motion_side=MOTION_SIDE)
    fps = info.fps
    transitions = detect_transitions(result.thumbnails, fps, stages.cuts)
    spans = clips_between(transitions, len(result.times), fps, stages.cuts)
    if not spans:
        return []
    times = result.times
    picks = sorted({float(times[i]) for a, b in spans for i in (a, (a + b) // 2, b - 1)})
    frames = dict(zip(picks, grab_frames(stages.open(uri), picks, stages.cfg.analysis_side), strict=True))
    rows = []
    for index, (a, b) in enumerate(spans):
        start_s, end_s = float(times[a]), float(times[b - 1]) + 1.0 / fps
        in_clip = (result.motion_times >= start_s) & (result.motion_times < end_s)
        motion = measure_motion(result.motion_frames[in_clip], MOTION_FPS)
        appearance = [frames[float(times[i])] for i in (a, (a + b) // 2, b - 1)]
        row = _row(uri, index, info, start_s, end_s, b - a, appearance, stages)
        row |= {"motion_score": motion.score, "camera_motion": motion.camera}
        if stages.autoencoder is not None:
            row["latents"] = _latents(uri, start_s, end_s, stages)
        rows.append(row)
    return rows


def _image_rows(uri: str, info: VideoInfo, stages: Stages) -> list[dict[str, Any]]:
    from PIL import Image

    source = stages.open(uri)
    with Image.open(source) as image:
        image = image.convert("RGB")
        scale = stages.cfg.analysis_side / min(image.size)
        pixels = np.asarray(
            image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
        )
    row = _row(uri, 0, info, 0.0, 0.0, 1, [pixels], stages)
    return [row | {"motion_score": 0.0, "camera_motion": "static"}]


def _row(
    uri: str,
    index: int,
    info: VideoInfo,
    start_s: float,
    end_s: float,
    num_frames: int,
    frames: list[np.ndarray],
    stages: Stages,
) -> dict[str, Any]:
    middle = frames[len(frames) // 2]
    captions: list[str] = []
    for captioner in stages.captioners:
        captions += [c for c in captioner.captions(uri, start_s, end_s, middle) if c not in captions]
    aesthetic, similarity = (
        stages.clip.score(frames, captions[0] if captions else None) if stages.clip else (None, None)
    )
    return {
        "clip_id": clip_id(uri, index),
        "video_uri": uri,
        "start_s": start_s,
        "end_s": end_s,
        "fps": info.fps,
        "width": info.width,
        "height": info.height,
        "num_frames": num_frames,
        "captions": captions,
        "aesthetic_score": aesthetic,
        "clip_score": similarity,
        "text_area": text_area(frames, stages.text),
        "source": stages.cfg.source or stages.cfg.input,
        "split": stages.cfg.split,
    }


def _latents(uri: str, start_s: float, end_s: float, stages: Stages) -> bytes | None:
    cfg = stages.cfg
    try:
        return encode_clip(
            stages.open(uri),
            stages.autoencoder,
            start_s=start_s,
            end_s=end_s,
            num_frames=cfg.latent_frames,
            fps=cfg.latent_fps,
            size=tuple(cfg.latent_size),
        )
    except DecodeError:
        return None  # too short for the latent frame count: the loader skips it when serving latents


_worker_stages: Stages | None = None  # one per worker process, set by its initializer


def _init_worker(cfg: CurateConfig) -> None:
    global _worker_stages
    _worker_stages = Stages.build(cfg)


def _curate_in_worker(uri: str) -> VideoResult:
    assert _worker_stages is not None, "worker used before its initializer ran"
    return curate_video(uri, _worker_stages)


def _results(cfg: CurateConfig, todo: list[str]) -> Iterator[VideoResult]:
    if cfg.workers == 0:
        stages = Stages.build(cfg)
        yield from (curate_video(uri, stages) for uri in todo)
        return
    context = multiprocessing.get_context("spawn")  # Lance, s3fs and torch are not fork-safe
    with context.Pool(cfg.workers, initializer=_init_worker, initargs=(cfg,)) as pool:
        yield from pool.imap_unordered(_curate_in_worker, todo)


@dataclass
class RunSummary:
    videos_in_shard: int
    skipped_existing: int
    curated: int = 0
    clips: int = 0
    status: Counter = field(default_factory=Counter)
    version: int | None = None
    tag: str | None = None


def _append(uri: str, table: pa.Table, storage: Storage) -> int:
    """Appends a commit (creating the table on the first); returns the new version."""
    options = storage.lance_options(uri)
    try:
        lance.dataset(uri, storage_options=options)
        mode = "append"
    except (ValueError, OSError):
        mode = "create"
    try:
        return lance.write_dataset(table, uri, mode=mode, storage_options=options).version
    except (ValueError, OSError):
        if mode != "create":
            raise
        # another shard created it between our check and our commit: append like everyone else
        return lance.write_dataset(table, uri, mode="append", storage_options=options).version


def run(cfg: CurateConfig, *, progress: bool = True) -> RunSummary:
    cfg.validate()
    storage = Storage.from_env()
    index, shards = cfg.shard_index()
    mine = [uri for uri in list_inputs(cfg.input, storage) if shard_of(uri, shards) == index]
    done = already_processed(cfg.output, storage)
    todo = [uri for uri in mine if uri not in done]
    summary = RunSummary(videos_in_shard=len(mine), skipped_existing=len(mine) - len(todo))
    rows: list[dict[str, Any]] = []
    logs: list[dict[str, Any]] = []

    def commit() -> None:
        if rows:  # clips first: a crash between the two commits leaves the video skipped, not doubled
            summary.version = _append(cfg.output, to_arrow(rows), storage)
        if logs:
            _append(log_uri(cfg.output), pa.Table.from_pylist(logs, schema=VIDEO_LOG), storage)
        rows.clear()
        logs.clear()

    started = time.perf_counter()
    bar = tqdm(total=len(todo), unit="video", desc=f"curating shard {index}/{shards}", disable=not progress)
    for result in _results(cfg, todo):
        rows += result.rows
        logs.append(result.log)
        summary.curated += 1
        summary.clips += len(result.rows)
        summary.status[result.log["status"]] += 1
        elapsed = time.perf_counter() - started
        bar.set_postfix(clips=summary.clips, clips_per_s=f"{summary.clips / elapsed:.1f}", refresh=False)
        bar.update()
        if len(logs) >= cfg.commit_every:
            commit()
    commit()
    bar.close()
    if summary.version is not None:
        summary.tag = cfg.tag or f"curate-{time.strftime('%Y%m%d-%H%M%S')}-shard{index}of{shards}"
        table = lance.dataset(cfg.output, storage_options=storage.lance_options(cfg.output))
        table.tags.create(summary.tag, summary.version)
    return summary
