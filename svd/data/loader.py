"""The distributed clip loader: a Lance table in object storage → (B, T, C, H, W) batches, resumable anywhere.

    loader = ClipLoader(LoaderConfig(table="s3://bucket/clips.lance", buckets=(Bucket(256, 384, 14, 4),),
                                     filter="motion_score > 0.3 AND text_area < 0.07"))
    for batch in loader:            # endless; the trainer decides when to stop
        ...
    checkpoint["data"] = loader.state_dict()    # {consumed per bucket, seed, table version, …}

Start-up: the rows passing the filter are found once per (table content, filter, buckets) by a scan of a
few columns, and their offsets are written, grouped by bucket, to one Arrow file that every process
memory-maps (`row_index.py`). Every step: `ClipSampler` (main process) picks the bucket and this rank's
stream positions; a worker maps positions to rows (`order.py`), fetches their metadata with Lance `take`,
decodes the clips and collates the batch. Lance handles are opened lazily inside each worker: Lance is not
fork-safe, and workers are spawned.

The state is the sampler's: samples consumed per bucket, the seed, the pinned table version and what
decides the rows of each bucket (bucket shapes, filter, table content). Each batch carries the state
*after* it, so `state_dict()` is exact even with batches prefetched, and it does not depend on the number
of ranks or workers: a run saved on 2 ranks resumes on 1 or 3. A state that does not match the config is
refused: resuming it would silently repeat or skip samples.

On many ranks, rank 0 builds the row index once for the whole run and publishes it next to the run; the
other ranks wait for it (up to `index_timeout_s`, not the collective timeout) and open it, one copy per node:

    shared = f"{run_dir}/row_index"
    share_row_index(cfg, storage, shared, state=state, collective_timeout_s=60)  # every rank; pin the version
    loader = ClipLoader(cfg, storage=storage, state=state, build_index=False, shared_index=shared)
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import io
import json
import multiprocessing.resource_tracker
import multiprocessing.util
import os
import signal
import sys
import threading
import warnings
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import lance
import numpy as np
import torch
import torch.distributed as dist
from torchdata.stateful_dataloader import StatefulDataLoader

from svd.collectives import decided_by_rank0
from svd.data import buckets as bucketing
from svd.data import row_index, schema
from svd.data.buckets import Bucket
from svd.data.exclusion import Exclusion, read_exclusion
from svd.data.order import rank_positions, stream_indices
from svd.data.row_index import RowIndex
from svd.data.storage import Storage, join, scheme, strip_scheme
from svd.data.video import DecodeError, decode_clip
from svd.errors import described, one_line
from svd.lifetime import die_with_parent

METADATA_COLUMNS = [
    "clip_id",
    "video_uri",
    "start_s",
    "end_s",
    "fps",
    "width",
    "height",
    "num_frames",
    "captions",
    "motion_score",
]


class LoaderError(RuntimeError):
    """A batch could not be produced; the message is one line naming the table, rows and what failed."""


@dataclass(frozen=True)
class LoaderConfig:
    table: str  # URI of the Lance clip table
    buckets: tuple[Bucket, ...]
    filter: str | None = None  # one Lance SQL boolean expression, e.g. a curation recipe's
    version: int | str | None = None  # a version number or tag; None: the latest at start, then pinned
    seed: int = 0
    num_workers: int = 2
    prefetch_factor: int = 2
    serve: str = "auto"  # "frames", "latents", or "auto": latents when the table has them
    motion_score_scale: float = 1.0  # motion_score that maps to motion bucket 255 (see motion_bucket_id)
    caption_weights: tuple[float, ...] | None = None  # per caption slot, e.g. (0.5, 0.25, 0.25); None: equal
    max_replacements: int = 16  # consecutive undecodable clips tolerated before the loader gives up
    # URI of a takedown list (svd/data/exclusion.py): its clips are replaced like undecodable ones
    exclude: str | None = None
    # Longest wait for one batch from a worker (worker start-up included); the storage clients' own
    # timeouts normally fail a read sooner. In process (num_workers=0) only those apply.
    batch_timeout_s: float = 600.0
    # Longest wait of the other ranks for rank 0's row-index build (`share_row_index`): a scan of the table's
    # index columns, minutes for 10⁸ rows on object storage, so not bounded by the collective timeout.
    index_timeout_s: float = 3600.0
    cache_dir: str = str(Path.home() / ".cache" / "svd" / "row_index")  # node-local copies of row indexes

    def __post_init__(self) -> None:
        if not self.buckets:
            raise ValueError("data.buckets is empty: give at least one (height, width, frames, batch_size)")
        if self.serve not in ("auto", "frames", "latents"):
            raise ValueError(f"data.serve={self.serve!r}; choose auto, frames or latents")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers={self.num_workers} must be ≥ 0")
        if self.motion_score_scale <= 0:
            raise ValueError(f"data.motion_score_scale={self.motion_score_scale} must be > 0")
        if self.caption_weights is not None and (
            min(self.caption_weights, default=-1) < 0 or sum(self.caption_weights) <= 0
        ):
            raise ValueError(f"data.caption_weights={self.caption_weights} must be ≥ 0 with a positive sum")
        if self.batch_timeout_s <= 0:
            raise ValueError(f"data.batch_timeout_s={self.batch_timeout_s} must be > 0")
        if self.index_timeout_s <= 0:
            raise ValueError(f"data.index_timeout_s={self.index_timeout_s} must be > 0")

    def shapes(self) -> list[list[float]]:
        """What decides a bucket's rows: (height, width, frames, fps); the batch size may change on resume."""
        return [[float(b.height), float(b.width), float(b.frames), float(b.fps)] for b in self.buckets]


@dataclass(frozen=True)
class LoaderState:
    consumed: tuple[int, ...]  # stream positions consumed per bucket (epoch = consumed // bucket size)
    seed: int
    table_version: int
    # What decides which row a position reads; None in states saved before they were recorded.
    buckets: list[list[float]] | None = None  # LoaderConfig.shapes()
    filter: str | None = None
    table_content: str | None = None  # row_index.content_id of the pinned version

    def to_dict(self) -> dict[str, Any]:
        return {
            "consumed": list(self.consumed),
            "seed": self.seed,
            "table_version": self.table_version,
            "buckets": self.buckets,
            "filter": self.filter,
            "table_content": self.table_content,
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> LoaderState:
        buckets = d.get("buckets")
        return LoaderState(
            tuple(int(c) for c in d["consumed"]),
            int(d["seed"]),
            int(d["table_version"]),
            None if buckets is None else [[float(x) for x in shape] for shape in buckets],
            d.get("filter"),
            d.get("table_content"),
        )


def bucket_seed(seed: int, bucket: int) -> int:
    """The seed of a bucket's own permutation: buckets are shuffled independently."""
    return seed + bucket


def motion_bucket_id(motion_score: np.ndarray, scale: float) -> np.ndarray:
    """The model's motion conditioning (0..255) from a clip's motion_score: linear, 255 at `scale`.

    The paper does not say how it maps scores to buckets; linear in the score keeps the conditioning
    interpretable (twice the motion, twice the id). Unscored clips (NaN) get 127, the released default.
    """
    ids = np.clip(np.round(255.0 * np.asarray(motion_score, np.float64) / scale), 0, 255)
    return np.where(np.isnan(ids), 127.0, ids).astype(np.float32)


def fps_id(sampled_fps: float) -> float:
    """The released model was conditioned on fps − 1 (diffusers' SVD pipeline does the same)."""
    return float(sampled_fps) - 1.0


def open_table(uri: str, storage: Storage, version: int | str | None = None) -> lance.LanceDataset:
    """The Lance clip table at `uri`, schema-checked."""
    try:
        table = lance.dataset(uri, version=version, storage_options=storage.lance_options(uri))
    except (ValueError, OSError) as e:
        problem = one_line(e) + storage.timeout_hint(e)
        raise FileNotFoundError(f"cannot open clip table {uri} (version {version}): {problem}") from None
    schema.validate(table.schema, where=uri)
    return table


@dataclass(frozen=True)
class BatchRequest:
    """What one rank reads in one step: a bucket and its stream positions, the positions the whole step
    reads on all ranks, and the state after the step."""

    bucket: int
    positions: np.ndarray
    step: tuple[int, int]  # [start, end) of the bucket's stream positions read by all ranks in this step
    state: LoaderState


class ClipSampler(torch.utils.data.Sampler):
    """Endless sequence of BatchRequests for one rank; identical bucket choices on every rank."""

    def __init__(
        self,
        sizes: tuple[int, ...],
        buckets: tuple[Bucket, ...],
        rank: int,
        world_size: int,
        state: LoaderState,
    ):
        super().__init__()
        self.sizes, self.buckets, self.rank, self.world_size = sizes, buckets, rank, world_size
        self.state = state

    def __iter__(self) -> Iterator[BatchRequest]:
        while True:
            consumed = self.state.consumed
            bucket = bucketing.choose(self.state.seed, consumed, self.sizes)
            per_rank = self.buckets[bucket].batch_size
            positions = rank_positions(consumed[bucket], per_rank, self.rank)
            step = (consumed[bucket], consumed[bucket] + per_rank * self.world_size)
            after = list(consumed)
            after[bucket] = step[1]
            self.state = dataclasses.replace(self.state, consumed=tuple(after))
            yield BatchRequest(bucket, positions, step, self.state)

    def schedule(self, steps: int) -> tuple[np.ndarray, np.ndarray]:
        """(bucket, first stream position) of each of the next `steps` steps, advancing the state as
        `__iter__` would: provenance replays a run with it. With one bucket holding rows the choice is always
        that bucket, so the positions are computed at once instead of step by step."""
        filled = [b for b, size in enumerate(self.sizes) if size]
        if len(filled) == 1:
            b = filled[0]
            width = self.buckets[b].batch_size * self.world_size
            starts = self.state.consumed[b] + width * np.arange(steps, dtype=np.int64)
            after = list(self.state.consumed)
            after[b] += width * steps
            self.state = dataclasses.replace(self.state, consumed=tuple(after))
            return np.full(steps, b, np.int64), starts
        chosen, starts = np.empty(steps, np.int64), np.empty(steps, np.int64)
        requests = iter(self)
        for i in range(steps):
            request = next(requests)
            chosen[i], starts[i] = request.bucket, request.step[0]
        return chosen, starts

    # Stateful protocol, so torchdata's StatefulDataLoader snapshots the sampler with each batch it delivers.
    def state_dict(self) -> dict[str, Any]:
        return self.state.to_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = LoaderState.from_dict(state)


@dataclass(frozen=True)
class LatentSpec:
    """How a table's latents were encoded: frames, sampling rate and pixel size (curation's latent_*)."""

    frames: int
    fps: float
    height: int
    width: int

    @staticmethod
    def of(table: lance.LanceDataset) -> LatentSpec | None:
        """The table's `svd.latents` metadata; None for tables written before curation recorded it."""
        raw = (table.schema.metadata or {}).get(schema.LATENTS_KEY)
        if raw is None:
            return None
        spec = json.loads(raw)
        return LatentSpec(int(spec["frames"]), float(spec["fps"]), int(spec["height"]), int(spec["width"]))


class ClipDataset(torch.utils.data.Dataset):
    """Turns a BatchRequest into a batch. Picklable; opens its table, index and files lazily per process."""

    def __init__(
        self,
        cfg: LoaderConfig,
        table_version: int,
        index_path: Path,
        serve: str,
        clip_bytes: bool,
        storage: Storage,
        exclusion: Exclusion | None = None,
    ):
        self.cfg, self.table_version, self.index_path, self.storage = cfg, table_version, index_path, storage
        self.exclusion = exclusion
        self.serve = serve
        self.clip_bytes = clip_bytes  # the table stores clips as their own files (a blob column)
        self._table: lance.LanceDataset | None = None
        self._index: RowIndex | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_table": None, "_index": None}

    @property
    def table(self) -> lance.LanceDataset:
        if self._table is None:
            self._table = open_table(self.cfg.table, self.storage, self.table_version)
        return self._table

    @property
    def index(self) -> RowIndex:
        if self._index is None:
            self._index = RowIndex(self.index_path)
        return self._index

    def __getitem__(self, request: BatchRequest) -> dict[str, Any]:
        where = f"{self.cfg.table} (version {self.table_version}), bucket {request.bucket}"
        try:
            return self._batch(request, where)
        except LoaderError:
            raise
        except Exception as e:  # anything else: name where it happened, in one line
            first = int(request.positions[0]) if len(request.positions) else None
            raise LoaderError(f"{where}, positions from {first}: {described(e)}") from e

    def _batch(self, request: BatchRequest, where: str) -> dict[str, Any]:
        b, bucket = request.bucket, self.cfg.buckets[request.bucket]
        rows = self._rows(b, request.positions)
        metas = self._metadata(rows)  # one `take` for the whole batch: one round trip to storage
        skipped: Counter[str] = Counter()
        samples, replaced = [], []
        for position, row, meta in zip(request.positions.tolist(), rows.tolist(), metas, strict=True):
            try:
                samples.append(self._sample(row, meta, bucket, position, where))
            except DecodeError as e:
                skipped[e.reason] += 1
                by, sample = self._replacement(request, position, skipped, e, where)
                samples.append(sample)
                replaced.append((position, by, e.reason))
        batch = _collate(samples, self.serve)
        positions = torch.from_numpy(request.positions)  # the stream positions this batch stands for
        return batch | {
            "position": positions,
            "bucket": b,
            "skipped": dict(skipped),
            "replaced": replaced,  # (position, the position read in its place, why): the run's lineage
            "state": request.state,
        }

    def _indices(self, b: int, positions: np.ndarray) -> np.ndarray:
        return stream_indices(positions, self.index.size(b), bucket_seed(self.cfg.seed, b))

    def _rows(self, b: int, positions: np.ndarray) -> np.ndarray:
        return self.index.rows(b, self._indices(b, positions))

    def _metadata(self, rows: np.ndarray) -> list[dict[str, Any]]:
        return self.table.take(rows.tolist(), columns=METADATA_COLUMNS).to_pylist()

    def _replacement_positions(self, request: BatchRequest, position: int) -> Iterator[int]:
        """Positions whose clips no rank reads in this step, for the sample at `position`.

        They walk the epoch's permutation back from its end, sample slot s of a G-sample step taking
        s, s + G, s + 2G, … from the end: deterministic (a resumed run sees the same batch), and distinct
        for the samples of one step (no replacement shared by two ranks), unless the bucket has fewer than
        G · attempts clips. A neighbour (p + 1) would be read by this batch or another rank as well.
        """
        b = request.bucket
        n = self.index.size(b)
        start, end = request.step
        read = set(self._indices(b, np.arange(start, end)).tolist())
        if len(read) >= n:  # the step reads every clip of the bucket: a repeat cannot be avoided
            read = set()
        epoch_start = position // n * n
        for k in range(position - start, position - start + (end - start) * n, end - start):
            candidate = epoch_start + n - 1 - k % n
            if int(self._indices(b, np.array([candidate]))[0]) not in read:
                yield candidate

    def _replacement(
        self, request: BatchRequest, position: int, skipped: Counter, error: DecodeError, where: str
    ) -> tuple[int, dict]:
        """A sample that cannot be decoded (or is excluded) is replaced by the first decodable one of its
        replacement positions (see `_replacement_positions`); returns that position and its sample."""
        b, bucket = request.bucket, self.cfg.buckets[request.bucket]
        attempts = 0
        for p in self._replacement_positions(request, position):
            if attempts == self.cfg.max_replacements:
                break
            attempts += 1
            row = int(self._rows(b, np.array([p]))[0])
            try:
                return p, self._sample(row, self._metadata(np.array([row]))[0], bucket, p, where)
            except DecodeError as e:
                skipped[e.reason] += 1
                error = e
        raise LoaderError(
            f"{where}: {attempts + 1} undecodable clips in a row for position {position}; last: {error}. "
            "Is the storage reachable?"
        )

    def _sample(
        self, row: int, meta: dict[str, Any], bucket: Bucket, position: int, where: str
    ) -> dict[str, Any]:
        if self.exclusion and self.exclusion.excludes(meta["clip_id"], meta["video_uri"]):
            raise DecodeError("excluded", f"row {row} ({meta['clip_id']}) is in data.exclude")
        try:
            return self._decode(row, meta, bucket, position)
        except (DecodeError, LoaderError):
            raise
        except Exception as e:  # name the clip: the batch-level message cannot
            raise LoaderError(
                f"{where}, row {row} ({meta['clip_id']}, {meta['video_uri']}): {described(e)}"
            ) from e

    def _decode(self, row: int, meta: dict[str, Any], bucket: Bucket, position: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.cfg.seed & 0xFFFFFFFF, position, row])
        sample = {
            "row": row,
            "clip_id": meta["clip_id"],
            "caption": self._caption(meta["captions"] or [""], rng),
            "motion_bucket_id": float(
                motion_bucket_id(
                    np.float64(np.nan if meta["motion_score"] is None else meta["motion_score"]),
                    self.cfg.motion_score_scale,
                )
            ),
        }
        if self.serve == "latents":
            blob = self.table.take_blobs("latents", indices=[row])[0]
            if blob is None:
                raise DecodeError("missing", f"row {row} ({meta['clip_id']}) has no latents")
            try:
                latents = np.load(io.BytesIO(blob.read()))
            except ValueError as e:
                raise DecodeError("corrupt", f"row {row} ({meta['clip_id']}) latents: {e}") from None
            # the rate the latents' frames were sampled at: never above the source's (see decode_clip)
            rate = min(bucket.fps, meta["fps"]) if meta["fps"] and meta["fps"] > 0 else bucket.fps
            return sample | {"latents": torch.from_numpy(latents), "fps_id": fps_id(rate)}
        source, start_s, end_s = self._source(row, meta)
        clip = decode_clip(
            source,
            start_s=start_s,
            end_s=end_s,
            num_frames=bucket.frames,
            fps=bucket.fps,
            size=(bucket.height, bucket.width),
            offset=float(rng.random()),
        )
        frames = torch.from_numpy(clip.frames).permute(0, 3, 1, 2)  # (T, 3, H, W) uint8
        return sample | {"frames": frames, "fps_id": fps_id(clip.fps) if clip.fps else 0.0}

    def _caption(self, captions: list[str], rng: np.random.Generator) -> str:
        """One of the clip's captions, by `caption_weights` per slot; uniform over the captions the clip
        has when the weights give them none (weights (0, 1) and a single caption)."""
        weights = np.zeros(len(captions))
        if self.cfg.caption_weights:
            given = self.cfg.caption_weights[: len(captions)]
            weights[: len(given)] = given
        if weights.sum() <= 0:
            weights[:] = 1.0
        return captions[int(rng.choice(len(captions), p=weights / weights.sum()))]

    def _source(self, row: int, meta: dict[str, Any]) -> tuple[Any, float, float]:
        """The clip's own encoded file when the table stores one (its timeline starts at 0), else a ranged
        reader on the source video and the clip's time range in it."""
        if self.clip_bytes:
            blob = self.table.take_blobs("clip_bytes", indices=[row])[0]
            if blob is not None:
                return blob, 0.0, meta["end_s"] - meta["start_s"]
        return self._open(meta["video_uri"]), meta["start_s"], meta["end_s"]

    def _open(self, uri: str):
        try:
            source = self.storage.reader(uri)
        except FileNotFoundError:
            raise DecodeError("missing", uri) from None
        if isinstance(source, str) and not os.path.exists(source):
            raise DecodeError("missing", uri)
        return source


def _collate(samples: list[dict[str, Any]], serve: str) -> dict[str, Any]:
    key = "latents" if serve == "latents" else "frames"
    batch = {
        key: torch.stack([s[key] for s in samples]),
        "row": torch.tensor([s["row"] for s in samples], dtype=torch.int64),
        "clip_id": [s["clip_id"] for s in samples],
        "caption": [s["caption"] for s in samples],
        "fps_id": torch.tensor([s["fps_id"] for s in samples], dtype=torch.float32),
        "motion_bucket_id": torch.tensor([s["motion_bucket_id"] for s in samples], dtype=torch.float32),
    }
    if key == "frames":
        batch["first_frame"] = batch["frames"][:, 0]  # the conditioning image of image-to-video
    return batch


def _identity(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


# Signals a scheduler or a user sends to every process of a job to stop it (Slurm: SIGTERM, and SIGUSR2 or
# SIGUSR1 before a time limit; Kubernetes: SIGTERM; a terminal: SIGINT). Workers ignore them: the rank
# decides when to stop, and it still needs its workers for the batches of the step under way.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


def _init_worker(_: int, parent: int) -> None:
    """A worker leaves when its rank is gone. torch's watchdog compares the parent pid with the one it saw at
    start, but a worker still importing torch when its rank died (a rank killed right after it spawned its
    workers) sees the reaper as its parent from the start and would poll its queue forever, holding the
    job's output open. So: leave now if the parent is already gone, and ask the kernel to kill this worker
    with its parent from here on."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    die_with_parent()
    if os.getppid() != parent:
        os._exit(0)
    atexit.register(_leave_without_finalizing)


# The batch iterators with live workers, for `_shut_down_at_exit`.
_RUNNING: weakref.WeakSet = weakref.WeakSet()


def _shut_down(batches: Iterator[dict[str, Any]]) -> None:
    """Stop an iterator's workers for sure. torch asks them to leave, waits a few seconds, then sends
    SIGTERM, which our workers ignore (stop signals are the rank's to handle): a worker still busy is then
    killed, since nothing it holds outlives it (it writes nothing but batches to its queue)."""
    workers = list(getattr(batches, "_workers", []))
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    for worker in workers:
        if worker.is_alive():
            worker.kill()
            worker.join()
    _RUNNING.discard(batches)


def _shut_down_at_exit() -> None:
    """A rank that ends on an exception may leave an iterator unclosed (a traceback still references it).
    multiprocessing's exit function would then SIGTERM its workers, which ignore it, and wait for them
    forever. It runs at the interpreter's exit (an atexit hook), and also, without atexit, when a process
    that multiprocessing started ends (the local launcher's ranks): its finalizers with an exit priority run
    first in both, so this is one."""
    for batches in list(_RUNNING):
        _shut_down(batches)


multiprocessing.util.Finalize(None, _shut_down_at_exit, exitpriority=100)


@contextmanager
def _new_processes_ignore_stop_signals() -> Iterator[None]:
    """Workers are born ignoring the stop signals, not only from `_init_worker` on: a spawned worker imports
    torch for seconds before it runs any of our code, and a signal then would kill it. An ignored signal is
    the one disposition a child keeps across exec. Meanwhile this process blocks them, so one that arrives
    stays pending (Linux never discards a blocked signal) and reaches this process's own handler afterwards.
    Signal dispositions belong to the main thread; elsewhere `_init_worker` alone protects the workers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    # Its first start unblocks SIGINT and SIGTERM in the caller: let that happen before we block them.
    multiprocessing.resource_tracker.ensure_running()
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    handlers = {signum: signal.signal(signum, signal.SIG_IGN) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _leave_without_finalizing() -> None:
    """A worker's last act, once torch's worker loop has returned.

    Why: when the consumer stops early, a worker exits while its queue's feeder thread may still be
    pickling a prefetched batch inside torch's C++ fd sharing (THPStorage_shareFd, GIL released). CPython
    3.11 ends such daemon threads at interpreter finalization with pthread_exit, whose forced unwind through
    that C++ frame calls std::terminate ("terminate called without an active exception"): the worker dies of
    SIGABRT and the main process raises "DataLoader worker … killed by signal: Aborted" from its SIGCHLD
    handler, wherever it happens to be. Nothing is left to do here, so the worker leaves at once.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class ClipLoader:
    """Iterable of batches for one rank; `state_dict()`/`load_state_dict()` resume it on any world size.

    `build_index=False`: open the row index that `ensure_row_index` built (rank 0, see `share_row_index`)
    instead of building it here; a missing index is an error, not a silent second scan. `shared_index`: the
    folder next to the run where rank 0 published it; a node without its own copy fetches one from there.
    """

    def __init__(
        self,
        cfg: LoaderConfig,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        storage: Storage | None = None,
        state: dict[str, Any] | None = None,
        build_index: bool = True,
        shared_index: str | None = None,
    ):
        self.cfg = cfg
        self.rank = int(os.environ.get("RANK", 0)) if rank is None else rank
        self.world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}")
        self.storage = storage or Storage.from_env()
        restored = LoaderState.from_dict(state) if state else None
        table = open_table(cfg.table, self.storage, _version(cfg, restored))
        self.table_version = table.version
        self.table_content = row_index.content_id(table)
        self.state = restored or LoaderState(
            (0,) * len(cfg.buckets),
            cfg.seed,
            self.table_version,
            cfg.shapes(),
            cfg.filter,
            self.table_content,
        )
        self._check_state(self.state)
        self.serve = _serve(cfg, table)
        self.clip_bytes = "clip_bytes" in table.schema.names
        self.index = _row_index(
            cfg, table, self.table_content, self.storage, build=build_index, shared=shared_index
        )
        self.sizes = tuple(self.index.size(b) for b in range(len(cfg.buckets)))
        if not any(self.sizes):
            raise ValueError(
                f"no row of {cfg.table} (version {self.table_version}) passes filter "
                f"{cfg.filter!r} into any bucket"
            )
        if self.serve == "latents":
            self._check_latents(table)
        self.exclusion = read_exclusion(cfg.exclude, self.storage) if cfg.exclude else None
        self.skipped: Counter[str] = Counter()
        # (bucket, position, replacement position, reason) of the batches delivered since `take_replaced`
        self.replaced: list[tuple[int, int, int, str]] = []

    def _check_latents(self, table: lance.LanceDataset) -> None:
        """Refuse buckets whose frames, size or rate differ from those the stored latents were encoded at:
        the model would be conditioned on an fps the latents do not have."""
        spec = LatentSpec.of(table)
        for b, bucket in enumerate(self.cfg.buckets):
            stored = self._stored_latent_shape(table, b) if self.sizes[b] else None
            if spec and (spec.frames, spec.fps, spec.height, spec.width) != (
                bucket.frames,
                bucket.fps,
                bucket.height,
                bucket.width,
            ):
                problem = f"{spec.frames} frames of {spec.height}×{spec.width} at {spec.fps:g} fps"
            elif stored and not _latents_fit(stored, bucket):
                problem = f"latents of shape {stored} (T, C, h, w)"
            else:
                continue
            raise ValueError(
                f"data.serve=latents: bucket {b} ({bucket.frames} frames of {bucket.height}×{bucket.width} "
                f"at {bucket.fps:g} fps) does not match what {self.cfg.table} stores: {problem}"
            )

    def _stored_latent_shape(self, table: lance.LanceDataset, b: int) -> tuple[int, ...] | None:
        """The shape of the first stored latents in bucket b, from the .npy header only."""
        rows = self.index.rows(b, np.arange(min(self.sizes[b], 8))).tolist()
        for blob in table.take_blobs("latents", indices=rows):
            if blob is None:
                continue
            try:
                version = np.lib.format.read_magic(blob)
                header = (
                    np.lib.format.read_array_header_1_0
                    if version == (1, 0)
                    else np.lib.format.read_array_header_2_0
                )
                return tuple(header(blob)[0])
            except ValueError:  # a corrupt blob: skipped and counted when it is served
                continue
        return None

    def _check_state(self, state: LoaderState) -> None:
        """Refuse, in one line, a state whose positions would read other rows than they did when saved."""
        cfg, differences = self.cfg, []
        if len(state.consumed) != len(cfg.buckets):
            differences.append(
                f"the state has {len(state.consumed)} buckets, data.buckets {len(cfg.buckets)}"
            )
        elif state.buckets is not None and state.buckets != cfg.shapes():
            differences.append(
                f"bucket shapes {state.buckets} ≠ data.buckets {cfg.shapes()} (h, w, frames, fps)"
            )
        if state.seed != cfg.seed:
            differences.append(f"seed {state.seed} ≠ data.seed={cfg.seed}")
        if state.buckets is not None and state.filter != cfg.filter:
            differences.append(f"filter {state.filter!r} ≠ data.filter={cfg.filter!r}")
        if state.table_version != self.table_version:
            differences.append(
                f"table version {state.table_version} ≠ the loader's {self.table_version} of {cfg.table}"
            )
        elif state.table_content not in (None, self.table_content):
            differences.append(
                f"{cfg.table} version {self.table_version} holds other rows than when the state was saved "
                "(re-created?)"
            )
        if differences:
            raise ValueError("loader state does not match: " + "; ".join(differences))

    def epoch(self, bucket: int = 0) -> int:
        return self.state.consumed[bucket] // max(self.sizes[bucket], 1)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        sampler = ClipSampler(self.sizes, self.cfg.buckets, self.rank, self.world_size, self.state)
        dataset = ClipDataset(
            self.cfg,
            self.table_version,
            self.index.path,
            self.serve,
            self.clip_bytes,
            self.storage,
            self.exclusion,
        )
        workers = self.cfg.num_workers
        warnings.filterwarnings("ignore", message="'set_vital' is deprecated")  # torchdata 0.11 noise
        loader = StatefulDataLoader(
            dataset,
            sampler=sampler,
            batch_size=None,
            collate_fn=_identity,
            num_workers=workers,
            prefetch_factor=self.cfg.prefetch_factor if workers else None,
            multiprocessing_context="spawn" if workers else None,
            persistent_workers=False,
            timeout=self.cfg.batch_timeout_s if workers else 0,
            worker_init_fn=functools.partial(_init_worker, parent=os.getpid()) if workers else None,
        )
        with _new_processes_ignore_stop_signals():
            batches = iter(loader)
        _RUNNING.add(batches)
        try:
            while True:
                batch = self._next(batches)
                self.state = batch.pop("state")
                self.skipped.update(batch["skipped"])
                self.replaced.extend((batch["bucket"], *r) for r in batch["replaced"])
                yield batch
        finally:  # closing (or dropping) this generator shuts its workers down
            _shut_down(batches)

    def _next(self, batches: Iterator[dict[str, Any]]) -> dict[str, Any]:
        """The next batch; a failure in a worker comes back as one line, not as torch's worker traceback."""
        try:
            return next(batches)
        except LoaderError as e:
            if "Original Traceback" not in str(e):
                raise  # raised in this process: its own message and traceback
            lines = [line for line in str(e).splitlines() if line.strip()]
            raise LoaderError(lines[-1].split("LoaderError: ", 1)[-1]) from None
        except RuntimeError as e:  # torch's own: timeout, a worker killed
            raise LoaderError(
                f"{self.cfg.table}: {one_line(e)} (data.batch_timeout_s={self.cfg.batch_timeout_s:g}, "
                f"data.num_workers={self.cfg.num_workers})"
            ) from None

    def state_dict(self) -> dict[str, Any]:
        """The state after the last batch delivered by this iterator (not after prefetched ones)."""
        return self.state.to_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        restored = LoaderState.from_dict(state)
        self._check_state(restored)
        self.state = restored

    def take_replaced(self) -> list[tuple[int, int, int, str]]:
        """The replacements of the batches delivered since the last call (a checkpoint records them)."""
        replaced, self.replaced = self.replaced, []
        return replaced

    def sampler(self, world_size: int, batch_sizes: tuple[int, ...], state: LoaderState) -> ClipSampler:
        """The sampler of a run on `world_size` ranks with these per-rank batch sizes, from `state`: what
        every rank of that run iterated (rank 0's positions; `schedule` gives the whole steps)."""
        buckets = tuple(
            dataclasses.replace(b, batch_size=s) for b, s in zip(self.cfg.buckets, batch_sizes, strict=True)
        )
        return ClipSampler(self.sizes, buckets, 0, world_size, state)


def ensure_row_index(
    cfg: LoaderConfig,
    storage: Storage,
    *,
    state: dict[str, Any] | None = None,
    shared: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Build the row index for this config (and state) unless it exists; returns its path. With `shared` (a
    folder next to the run), the index is published there for the other nodes (see `share_row_index`).

    The ranks must resolve the same table version: give them the same `state`, or pin `cfg.version` when
    the table may grow meanwhile.
    """
    restored = LoaderState.from_dict(state) if state else None
    table = open_table(cfg.table, storage, _version(cfg, restored))
    content = row_index.content_id(table)
    return _row_index(cfg, table, content, storage, build=True, shared=shared, progress=progress).path


def share_row_index(
    cfg: LoaderConfig,
    storage: Storage,
    shared: str,
    *,
    state: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = print,
    collective_timeout_s: float,
) -> None:
    """Rank 0 builds the row index once for the whole run and publishes it in `shared`; the other ranks wait
    for it, then open it with `ClipLoader(…, build_index=False, shared_index=shared)`. Call it on every rank.

    Why not a barrier: the build is a table scan whose length grows with the table, while a collective's
    timeout is sized for a dead rank. The ranks wait in a gloo group of their own whose deadline is
    `cfg.index_timeout_s`, and rank 0 hands them its outcome, so a failed build is raised on every rank
    (in one line) instead of leaving them to time out. One scan per run, not one per node: 32 nodes reading
    the same columns at once would read the table 32 times from the same store.

    The wait is one-sided, and so is its deadline (a gloo group's timeout is each process's own): rank 0
    waits for nobody's work, only for the others to join the group and take its outcome, which ranks in
    step do at once. It gives them `collective_timeout_s`, so a rank that died or froze before this call
    (the validation loader is built at the first validation) fails the run within the collective timeout
    instead of holding rank 0 for `index_timeout_s`, an hour by default.
    """
    if not dist.is_initialized():
        ensure_row_index(cfg, storage, state=state, shared=shared, progress=progress)
        return
    rank0 = dist.get_rank() == 0
    waits_s = collective_timeout_s if rank0 else cfg.index_timeout_s
    try:
        group = dist.new_group(backend="gloo", timeout=timedelta(seconds=waits_s))
    except (RuntimeError, dist.DistError) as e:  # gloo connects the group's ranks: one did not come in time
        setting = "parallel.collective_timeout_s" if rank0 else "data.index_timeout_s"
        raise LoaderError(
            f"sharing the row index of {cfg.table}: a rank did not join within {setting}={waits_s:g} "
            f"({one_line(e)})"
        ) from e
    try:
        decided_by_rank0(
            lambda: ensure_row_index(cfg, storage, state=state, shared=shared, progress=progress),
            failed=lambda cause: LoaderError(f"rank 0 could not build the row index of {cfg.table}: {cause}"),
            group=group,
        )
    finally:
        dist.destroy_process_group(group)


def _version(cfg: LoaderConfig, state: LoaderState | None) -> int | str | None:
    return state.table_version if state else cfg.version


def _serve(cfg: LoaderConfig, table: lance.LanceDataset) -> str:
    has_latents = "latents" in table.schema.names
    if cfg.serve == "latents" and not has_latents:
        raise ValueError(f"data.serve=latents but {cfg.table} has no 'latents' column")
    return "latents" if cfg.serve == "latents" or (cfg.serve == "auto" and has_latents) else "frames"


def _row_index(
    cfg: LoaderConfig,
    table: lance.LanceDataset,
    content: str,
    storage: Storage,
    *,
    build: bool,
    shared: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> RowIndex:
    """This node's copy of the index: found in `cfg.cache_dir`, else copied from `shared` (once per node),
    else built (and published to `shared`) when `build`. A local `shared` folder is seen by every node (the
    checkpointer checked that the run directory is shared), so the index is built and mapped there."""
    expression = row_index.check_filter(table, cfg.filter, cfg.table) if cfg.filter is not None else None
    path = row_index.index_path(cfg.cache_dir, cfg.table, content, cfg.filter, cfg.buckets)
    published = join(shared, path.name) if shared else None
    if published and scheme(published) == "file":
        path, published = Path(strip_scheme(published)), None
    if path.exists():
        index = RowIndex(path)
    elif published and (copy := _published_copy(published, cfg.cache_dir, storage)):
        return RowIndex(copy)
    elif build:
        index = row_index.build(table, expression, cfg.buckets, path, progress)
    else:
        raise FileNotFoundError(
            f"no row index for {cfg.table} (version {table.version}) in data.cache_dir={cfg.cache_dir}"
            + (f" or {shared}" if shared else "")
            + ": rank 0 builds it (share_row_index or ensure_row_index) before the others open it"
        )
    if build and published:  # also when this node had it from an earlier run: the others may not
        fs, target = storage.fsspec(published)
        if not fs.exists(target):
            fs.put_file(str(path), target)  # one PUT: an object appears whole or not at all
    return index


def _published_copy(published: str, cache_dir: str, storage: Storage) -> Path | None:
    """This node's copy of a published index (downloaded once per node); None when it is not published."""
    try:
        return Path(storage.local_copy(published, cache_dir))
    except FileNotFoundError:
        return None


def _latents_fit(shape: tuple[int, ...], bucket: Bucket) -> bool:
    """(T, C, h, w) latents fit a bucket when T is its frame count and (h, w) its size over one factor."""
    if len(shape) != 4 or shape[0] != bucket.frames or not shape[2] or not shape[3]:
        return False
    factor = bucket.height // shape[2]
    return shape[2] * factor == bucket.height and shape[3] * factor == bucket.width
