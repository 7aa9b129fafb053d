"""The distributed clip loader: a Lance table in object storage → (B, T, C, H, W) batches, resumable anywhere.

    loader = ClipLoader(LoaderConfig(table="s3://bucket/clips.lance", buckets=(Bucket(256, 384, 14, 4),),
                                     filter="motion_score > 0.3 AND text_area < 0.07"))
    for batch in loader:            # endless; the trainer decides when to stop
        ...
    checkpoint["data"] = loader.state_dict()    # {consumed per bucket, seed, table version}

Start-up: the rows passing the filter are found once per (table version, filter, buckets) by a scan of a
few columns, and their offsets are written, grouped by bucket, to one Arrow file that every process
memory-maps (`RowIndex`). Every step: `ClipSampler` (main process) picks the bucket and this rank's stream
positions; a worker maps positions to rows (`order.py`), fetches their metadata with Lance `take`,
decodes the clips and collates the batch. Lance handles are opened lazily inside each worker: Lance is not
fork-safe, and workers are spawned.

The state is the sampler's: samples consumed per bucket, the seed and the pinned table version. Each batch
carries the state *after* it, so `state_dict()` is exact even with batches prefetched, and it does not
depend on the number of ranks or workers: a run saved on 2 ranks resumes on 1 or 3.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lance
import numpy as np
import pyarrow as pa
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from svd.data import buckets as bucketing
from svd.data import schema
from svd.data.buckets import Bucket
from svd.data.order import rank_positions, stream_indices
from svd.data.storage import Storage
from svd.data.video import DecodeError, decode_clip

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
_INDEX_COLUMNS = {
    "width": "width",
    "height": "height",
    "num_frames": "num_frames",
    "fps": "fps",
    "duration": "end_s - start_s",
}
_ROW_INDEX_FORMAT = 1


@dataclass(frozen=True)
class LoaderConfig:
    table: str  # URI of the Lance clip table
    buckets: tuple[Bucket, ...]
    filter: str | None = None  # Lance SQL predicate, e.g. a curation recipe's
    version: int | str | None = None  # a version number or tag; None: the latest at start, then pinned
    seed: int = 0
    num_workers: int = 2
    prefetch_factor: int = 2
    serve: str = "auto"  # "frames", "latents", or "auto": latents when the table has them
    motion_score_scale: float = 1.0  # motion_score that maps to motion bucket 255 (see motion_bucket_id)
    caption_weights: tuple[float, ...] | None = (
        None  # per caption slot, e.g. (0.5, 0.25, 0.25); None: uniform
    )
    max_replacements: int = 16  # consecutive undecodable clips tolerated before the loader gives up
    cache_dir: str = str(Path.home() / ".cache" / "svd" / "row_index")

    def __post_init__(self) -> None:
        if not self.buckets:
            raise ValueError("data.buckets is empty: give at least one (height, width, frames, batch_size)")
        if self.serve not in ("auto", "frames", "latents"):
            raise ValueError(f"data.serve={self.serve!r}; choose auto, frames or latents")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers={self.num_workers} must be ≥ 0")
        if self.motion_score_scale <= 0:
            raise ValueError(f"data.motion_score_scale={self.motion_score_scale} must be > 0")


@dataclass(frozen=True)
class LoaderState:
    consumed: tuple[int, ...]  # stream positions consumed per bucket (epoch = consumed // bucket size)
    seed: int
    table_version: int

    def to_dict(self) -> dict[str, Any]:
        return {"consumed": list(self.consumed), "seed": self.seed, "table_version": self.table_version}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> LoaderState:
        return LoaderState(tuple(int(c) for c in d["consumed"]), int(d["seed"]), int(d["table_version"]))


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
        raise FileNotFoundError(f"cannot open clip table {uri} (version {version}): {e}") from None
    schema.validate(table.schema, where=uri)
    return table


class RowIndex:
    """Offsets of the rows that pass the filter, grouped by bucket, in a memory-mapped Arrow file."""

    def __init__(self, path: Path):
        self.path = path
        reader = pa.ipc.open_file(pa.memory_map(str(path)))
        meta = json.loads(reader.schema.metadata[b"svd.row_index"])
        if meta["format"] != _ROW_INDEX_FORMAT:
            raise ValueError(f"{path}: row index format {meta['format']}, expected {_ROW_INDEX_FORMAT}")
        self.starts: list[int] = meta["starts"]
        self.offsets = reader.read_all().column("offset").to_numpy()  # zero-copy view of the mapping

    def size(self, bucket: int) -> int:
        return self.starts[bucket + 1] - self.starts[bucket]

    def rows(self, bucket: int, indices: np.ndarray) -> np.ndarray:
        """Table offsets of the given indices within a bucket."""
        return self.offsets[self.starts[bucket] + indices].astype(np.int64)

    @staticmethod
    def key(uri: str, version: int, filter: str | None, buckets: tuple[Bucket, ...]) -> str:
        shapes = [(b.height, b.width, b.frames, b.fps) for b in buckets]
        spec = json.dumps([uri, version, filter, shapes, schema.SCHEMA_VERSION, _ROW_INDEX_FORMAT])
        return hashlib.sha256(spec.encode()).hexdigest()[:24]

    @staticmethod
    def build(
        table: lance.LanceDataset, filter: str | None, buckets: tuple[Bucket, ...], path: Path
    ) -> RowIndex:
        """Scan the columns that decide membership, stream by stream, and write the index atomically."""
        columns = dict(_INDEX_COLUMNS) | ({"keep": filter} if filter else {})
        per_bucket: list[list[np.ndarray]] = [[] for _ in buckets]
        base = 0
        for batch in table.scanner(columns=columns, scan_in_order=True, batch_size=1 << 16).to_batches():
            cols = {name: batch.column(name).to_numpy(zero_copy_only=False) for name in _INDEX_COLUMNS}
            assigned = bucketing.assign(buckets, **cols)
            if filter:
                assigned[~batch.column("keep").fill_null(False).to_numpy(zero_copy_only=False)] = -1
            for b in range(len(buckets)):
                per_bucket[b].append(np.nonzero(assigned == b)[0].astype(np.uint64) + np.uint64(base))
            base += batch.num_rows
        groups = [np.concatenate(g) if g else np.zeros(0, np.uint64) for g in per_bucket]
        starts = np.concatenate([[0], np.cumsum([len(g) for g in groups])]).tolist()
        meta = {
            "format": _ROW_INDEX_FORMAT,
            "starts": starts,
            "filter": filter,
            "table_version": table.version,
        }
        index = pa.table({"offset": np.concatenate(groups)})
        index = index.replace_schema_metadata({b"svd.row_index": json.dumps(meta).encode()})
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, index.schema) as writer:
            writer.write_table(index)
        os.replace(tmp, path)  # concurrent builders write identical files; the rename is atomic
        return RowIndex(path)


@dataclass(frozen=True)
class BatchRequest:
    """What one rank reads in one step: a bucket and its stream positions, and the state after the step."""

    bucket: int
    positions: np.ndarray
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
            after = list(consumed)
            after[bucket] += per_rank * self.world_size
            self.state = dataclasses.replace(self.state, consumed=tuple(after))
            yield BatchRequest(bucket, positions, self.state)

    # Stateful protocol, so torchdata's StatefulDataLoader snapshots the sampler with each batch it delivers.
    def state_dict(self) -> dict[str, Any]:
        return self.state.to_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = LoaderState.from_dict(state)


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
    ):
        self.cfg, self.table_version, self.index_path, self.storage = cfg, table_version, index_path, storage
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
        b, bucket = request.bucket, self.cfg.buckets[request.bucket]
        rows = self._rows(b, request.positions)
        metas = self._metadata(rows)  # one `take` for the whole batch: one round trip to storage
        skipped: Counter[str] = Counter()
        samples = []
        for position, row, meta in zip(request.positions.tolist(), rows.tolist(), metas, strict=True):
            try:
                samples.append(self._sample(row, meta, bucket, position))
            except DecodeError as e:
                skipped[e.reason] += 1
                samples.append(self._replacement(b, bucket, position, skipped, e))
        batch = _collate(samples, self.serve)
        positions = torch.from_numpy(request.positions)  # the stream positions this batch stands for
        return batch | {"position": positions, "bucket": b, "skipped": dict(skipped), "state": request.state}

    def _rows(self, b: int, positions: np.ndarray) -> np.ndarray:
        return self.index.rows(b, stream_indices(positions, self.index.size(b), self.cfg.seed + b))

    def _metadata(self, rows: np.ndarray) -> list[dict[str, Any]]:
        return self.table.take(rows.tolist(), columns=METADATA_COLUMNS).to_pylist()

    def _replacement(
        self, b: int, bucket: Bucket, position: int, skipped: Counter, error: DecodeError
    ) -> dict:
        """A sample that cannot be decoded is replaced by the next decodable position — deterministically,
        so a resumed run sees the same batch."""
        for p in range(position + 1, position + 1 + self.cfg.max_replacements):
            row = int(self._rows(b, np.array([p]))[0])
            try:
                return self._sample(row, self._metadata(np.array([row]))[0], bucket, p)
            except DecodeError as e:
                skipped[e.reason] += 1
                error = e
        raise RuntimeError(
            f"{self.cfg.max_replacements + 1} consecutive undecodable clips from position {position} of "
            f"bucket {b} in {self.cfg.table}; last: {error}. Is the storage reachable?"
        )

    def _sample(self, row: int, meta: dict[str, Any], bucket: Bucket, position: int) -> dict[str, Any]:
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
            latents = np.load(io.BytesIO(blob.read()))
            return sample | {"latents": torch.from_numpy(latents), "fps_id": fps_id(bucket.fps)}
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
        weights = np.ones(len(captions))
        if self.cfg.caption_weights:
            weights = np.array(
                [w for w, _ in zip(self.cfg.caption_weights, captions, strict=False)], np.float64
            )
            weights = np.pad(weights, (0, len(captions) - len(weights)))
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


class ClipLoader:
    """Iterable of batches for one rank; `state_dict()`/`load_state_dict()` resume it on any world size."""

    def __init__(
        self,
        cfg: LoaderConfig,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        storage: Storage | None = None,
        state: dict[str, Any] | None = None,
    ):
        self.cfg = cfg
        self.rank = int(os.environ.get("RANK", 0)) if rank is None else rank
        self.world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}")
        self.storage = storage or Storage.from_env()
        restored = LoaderState.from_dict(state) if state else None
        version = restored.table_version if restored else cfg.version
        table = open_table(cfg.table, self.storage, version)
        self.table_version = table.version
        self.serve = self._resolve_serve(table)
        self.clip_bytes = "clip_bytes" in table.schema.names
        self.index = self._row_index(table)
        self.sizes = tuple(self.index.size(b) for b in range(len(cfg.buckets)))
        if not any(self.sizes):
            raise ValueError(
                f"no row of {cfg.table} (version {self.table_version}) passes filter "
                f"{cfg.filter!r} into any bucket"
            )
        self.state = restored or LoaderState((0,) * len(cfg.buckets), cfg.seed, self.table_version)
        self._check_state(self.state)
        self.skipped: Counter[str] = Counter()

    def _resolve_serve(self, table: lance.LanceDataset) -> str:
        has_latents = "latents" in table.schema.names
        if self.cfg.serve == "latents" and not has_latents:
            raise ValueError(f"data.serve=latents but {self.cfg.table} has no 'latents' column")
        return (
            "latents"
            if self.cfg.serve == "latents" or (self.cfg.serve == "auto" and has_latents)
            else "frames"
        )

    def _row_index(self, table: lance.LanceDataset) -> RowIndex:
        key = RowIndex.key(self.cfg.table, table.version, self.cfg.filter, self.cfg.buckets)
        path = Path(self.cfg.cache_dir) / f"{key}.arrow"
        return (
            RowIndex(path)
            if path.exists()
            else RowIndex.build(table, self.cfg.filter, self.cfg.buckets, path)
        )

    def _check_state(self, state: LoaderState) -> None:
        if len(state.consumed) != len(self.cfg.buckets):
            raise ValueError(
                f"loader state has {len(state.consumed)} buckets, data.buckets has {len(self.cfg.buckets)}"
            )
        if state.table_version != self.table_version:
            raise ValueError(
                f"loader state is for table version {state.table_version}, "
                f"the loader reads version {self.table_version}"
            )

    def epoch(self, bucket: int = 0) -> int:
        return self.state.consumed[bucket] // max(self.sizes[bucket], 1)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        sampler = ClipSampler(self.sizes, self.cfg.buckets, self.rank, self.world_size, self.state)
        dataset = ClipDataset(
            self.cfg, self.table_version, self.index.path, self.serve, self.clip_bytes, self.storage
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
        )
        for batch in loader:
            self.state = batch.pop("state")
            self.skipped.update(batch["skipped"])
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """The state after the last batch delivered by this iterator (not after prefetched ones)."""
        return self.state.to_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        restored = LoaderState.from_dict(state)
        self._check_state(restored)
        self.state = restored
