"""Raw videos → scored clips in a Lance table: the curation run.

Per video (in a pool of worker processes): probe → one decoding pass (thumbnails for cuts, 2 fps frames
for motion) → cut detection → clips → per clip: motion, first/middle/last frames → captions, CLIP
aesthetic and similarity scores, text area (→ optional latents). The main process appends finished clips
to the table every `commit_every` videos and records every video it finished — with its clips, or with
the reason it was rejected — in a log table beside it (`<table>.videos.lance`).

Resumable: a rerun skips videos that are done (`svd.curate.ledger`: clips in the table, or a final
record in the log), so a crash loses at most the uncommitted batch; videos that failed for a transient
reason (storage, model loading) are retried, and such a run ends with `RunSummary.transient` > 0.
Shardable: `shard=i/n` takes the videos whose canonical URI hashes to i mod n, so n processes (or a Slurm
array) curate disjoint parts into one table; commits merge on `clip_id`, so concurrent or repeated runs
of one shard never add a clip twice.

Everything that can be checked before the first video is: settings, the input (exists, has media), the
output (reachable, writable, schema, tag) and every stage (models load), once, in this process.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from svd.curate.aesthetics import ClipScorer
from svd.curate.captions import Captioner, ModelCaptioner, SidecarCaptioner
from svd.curate.config import CurateConfig
from svd.curate.cuts import CutConfig, clips_between, detect_transitions
from svd.curate.latents import encode_clip
from svd.curate.ledger import (
    TRANSIENT,
    VIDEO_LOG,
    already_processed,
    check_output,
    commit,
    default_tag,
    tag_version,
)
from svd.curate.motion import measure_motion
from svd.curate.ocr import LearnedTextDetector, MorphologicalTextDetector, TextDetector, text_area
from svd.curate.probe import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, RejectionError, VideoInfo, probe
from svd.curate.provenance import record_curation
from svd.curate.scan import grab_frames, scan
from svd.data.storage import Storage, canonical_uri, scheme
from svd.data.table import to_arrow
from svd.data.video import DecodeError
from svd.errors import described
from svd.model.autoencoder import Autoencoder, AutoencoderConfig, build_autoencoder

MOTION_FPS = 2.0
MOTION_SIDE = 16
MAX_ERROR_LINES = 20  # transient errors a summary spells out; all are counted and logged in the table


class InputError(Exception):
    """The input holds nothing to curate; the message is one line naming it."""


class StageError(Exception):
    """A stage that cannot be built (a model that does not load); the message names its setting."""


def list_inputs(input_uri: str, storage: Storage) -> list[str]:
    """Every video and image under `input_uri`, as canonical URIs, in a stable order. An input with no
    file at all raises InputError: a mistyped prefix must not look like a finished run."""
    root = canonical_uri(input_uri)
    fs, path = storage.fsspec(root)
    try:
        paths = [fs._strip_protocol(path)] if fs.isfile(path) else fs.find(path)
    except FileNotFoundError:
        paths = []
    except Exception as e:  # endpoint down, credentials, permissions: whatever the client raises
        raise InputError(f"input={input_uri}: cannot be listed: {described(e)}") from None
    if not paths:
        raise InputError(f"input={input_uri}: no such file or folder, or nothing in it")
    prefix = "" if scheme(root) == "file" else f"{scheme(root)}://"
    media = [p for p in paths if p.lower().endswith(VIDEO_EXTENSIONS + IMAGE_EXTENSIONS)]
    if not media:
        kinds = ", ".join(VIDEO_EXTENSIONS + IMAGE_EXTENSIONS)
        raise InputError(f"input={input_uri}: {len(paths)} files, none a video or image ({kinds})")
    return sorted(canonical_uri(prefix + p) for p in media)


def shard_of(uri: str, shards: int) -> int:
    """Stable across listings and machines: a hash of the (canonical) URI, not its position in a list."""
    return int(hashlib.sha1(uri.encode()).hexdigest()[:12], 16) % shards


def clip_id(video_uri: str, index: int) -> str:
    return f"{hashlib.sha1(video_uri.encode()).hexdigest()[:16]}-{index:04d}"


def _build(setting: str, make: Callable[[], Any]) -> Any:
    try:
        return make()
    except Exception as e:  # whatever a model library raises for a bad folder: name the setting instead
        raise StageError(f"{setting}: cannot be loaded: {described(e)}") from None


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
        """Raises StageError naming the setting of the first stage that cannot be built."""
        storage = Storage.from_env()

        def local(uri: str | None) -> str | None:
            return storage.local_copy(uri, cfg.cache_dir) if uri else None

        captioners: list[Captioner] = []
        if cfg.captioner:
            model = _build(f"captioner={cfg.captioner}", lambda: ModelCaptioner(local(cfg.captioner)))
            captioners.append(model)
        captioners.append(SidecarCaptioner(storage))
        text: TextDetector = (
            _build(
                f"text_detector={cfg.text_detector}", lambda: LearnedTextDetector(local(cfg.text_detector))
            )
            if cfg.text_detector
            else MorphologicalTextDetector()
        )
        clip = (
            _build(
                f"clip_model={cfg.clip_model}, aesthetic_head={cfg.aesthetic_head}",
                lambda: ClipScorer(local(cfg.clip_model), local(cfg.aesthetic_head)),
            )
            if cfg.clip_model
            else None
        )
        autoencoder = (
            _build(
                f"autoencoder={cfg.autoencoder}, autoencoder_path={cfg.autoencoder_path}",
                lambda: build_autoencoder(
                    AutoencoderConfig(kind=cfg.autoencoder, pretrained=local(cfg.autoencoder_path))
                ),
            )
            if cfg.latents
            else None
        )
        return Stages(
            cfg=cfg,
            storage=storage,
            cuts=CutConfig(detector=cfg.cut_detector, min_clip_s=cfg.min_clip_s, max_clip_s=cfg.max_clip_s),
            text=text,
            captioners=captioners,
            clip=clip,
            autoencoder=autoencoder,
        )

    def open(self, uri: str) -> str | BinaryIO:
        return self.storage.reader(uri, block_size=8 << 20)  # whole videos are read: larger requests


@dataclass
class VideoResult:
    rows: list[dict[str, Any]]
    log: dict[str, Any]


def curate_video(uri: str, stages: Stages) -> VideoResult:
    """All stages for one video (or image); never raises: failures become a log record with a reason,
    final for a rejection of the input itself, TRANSIENT (retried by the next run) for anything else."""
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
    except Exception as e:  # one failure must not stop a run of millions: record it, retry it next run
        rows, status = [], TRANSIENT
        detail = f"{described(e)} | {traceback.format_exc(limit=3)!r}"
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


def _transient(uri: str, detail: str) -> VideoResult:
    log = dict.fromkeys(VIDEO_LOG.names) | {"video_uri": uri, "status": TRANSIENT, "clips": 0}
    log["detail"] = detail
    return VideoResult([], log)


_worker_stages: Stages | str | None = None  # per worker process: its stages, or why they failed to build


def _init_worker(cfg: CurateConfig) -> None:
    global _worker_stages
    try:
        _worker_stages = Stages.build(cfg)
    except Exception as e:  # raising here would make the pool respawn this worker forever
        _worker_stages = f"stages failed to build in a worker: {described(e)}"


def _curate_in_worker(uri: str) -> VideoResult:
    assert _worker_stages is not None, "worker used before its initializer ran"
    if isinstance(_worker_stages, str):
        return _transient(uri, _worker_stages)
    return curate_video(uri, _worker_stages)


def _results(cfg: CurateConfig, todo: list[str], stages: Stages | None) -> Iterator[VideoResult]:
    """In this process with `stages` (workers=0), else in a pool whose workers build their own."""
    if stages is not None:
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
    errors: list[str] = field(default_factory=list)  # a line for each of the first transient errors
    version: int | None = None
    tag: str | None = None

    @property
    def transient(self) -> int:
        """Videos to retry: a run with any exits non-zero."""
        return self.status[TRANSIENT]


def run(cfg: CurateConfig, *, progress: bool = True) -> RunSummary:
    """Raises ValueError (settings), InputError, OutputError, TableUnreadableError or StageError, each
    with one line, before any video is curated."""
    cfg.validate()
    storage = Storage.from_env()
    index, shards = cfg.shard_index()
    mine = [uri for uri in list_inputs(cfg.input, storage) if shard_of(uri, shards) == index]
    check_output(cfg.output, storage, latents=cfg.latents, tag=cfg.tag)
    done = already_processed(cfg.output, storage)
    todo = [uri for uri in mine if uri not in done]
    summary = RunSummary(videos_in_shard=len(mine), skipped_existing=len(mine) - len(todo))
    if not todo:
        return summary
    stages = Stages.build(cfg)  # here first: a stage that cannot load fails once, before any pool starts
    record_curation(cfg.output, cfg, storage)  # how its clips are made, before the first of them
    results = _results(cfg, todo, stages if cfg.workers == 0 else None)
    del stages  # with workers, each builds its own: this copy would only hold memory
    optional = ["latents"] if cfg.latents else []
    rows: list[dict[str, Any]] = []
    logs: list[dict[str, Any]] = []

    def flush() -> None:
        version = commit(
            cfg.output, to_arrow(rows, optional), pa.Table.from_pylist(logs, schema=VIDEO_LOG), storage
        )
        summary.version = version if version is not None else summary.version
        rows.clear()
        logs.clear()

    started = time.perf_counter()
    desc = f"curating shard {index}/{shards}"
    # closing(): an interrupt stops the pool at once, not when the generator is collected at exit
    with closing(results), tqdm(total=len(todo), unit="video", desc=desc, disable=not progress) as bar:
        for result in results:
            rows += result.rows
            logs.append(result.log)
            summary.curated += 1
            summary.clips += len(result.rows)
            summary.status[result.log["status"]] += 1
            if result.log["status"] == TRANSIENT and len(summary.errors) < MAX_ERROR_LINES:
                summary.errors.append(f"{result.log['video_uri']}: {result.log['detail'].split(' | ')[0]}")
            elapsed = time.perf_counter() - started
            bar.set_postfix(clips=summary.clips, clips_per_s=f"{summary.clips / elapsed:.1f}", refresh=False)
            bar.update()
            if len(logs) >= cfg.commit_every:
                flush()
        flush()
    if summary.version is not None:
        summary.tag = cfg.tag or default_tag(cfg.shard)
        tag_version(cfg.output, storage, summary.tag, summary.version)
    return summary
