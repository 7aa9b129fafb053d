"""Clips/s delivered per rank by ClipLoader from a local Ceph radosgw, against two baselines in the same run:

  (a) the decode limit: the same clips decoded with PyAV straight from local files, in one process;
  (b) a Parquet loader: the same metadata as Parquet (pyarrow's default writer settings) on the same S3
      server, each batch's rows read with pyarrow's dataset `take` (memory-bounded random access, like
      ours) through the same number of workers, clips decoded the same way.

    infra/local/radosgw.sh start   # optional: else the benchmark starts it, and stops it at the end
    python bench/loader.py --workers 4

Every loader reads the same rows in the same order (the loader's global order), so the ratios compare
access paths, not workloads. Run on radosgw, never on moto: moto's ranged reads slow down with object size.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import statistics
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch

from svd.data.buckets import Bucket
from svd.data.loader import ClipLoader, LoaderConfig, open_table
from svd.data.local_s3 import create_bucket
from svd.data.order import stream_indices
from svd.data.storage import Storage
from svd.data.synthetic import panning_texture
from svd.data.table import to_arrow, write_clip_table
from svd.data.video import decode_clip
from svd.data.video_io import encode_mp4

ROOT = Path(__file__).resolve().parents[1]
CAPTION_TEXT = (
    "a camera slowly pans across a colourful textured surface with bright small patches of red green and "
    "blue light in a daylight scene of video footage showing motion"
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", type=int, default=16)
    p.add_argument("--seconds", type=float, default=6.0, help="length of each source video")
    p.add_argument("--video-size", type=int, nargs=2, default=[360, 640], metavar=("H", "W"))
    p.add_argument("--source-fps", type=float, default=24.0)
    p.add_argument("--rows", type=int, default=200_000, help="clip rows in the metadata table")
    p.add_argument(
        "--bucket", type=int, nargs=4, default=[256, 384, 8, 4], metavar=("H", "W", "FRAMES", "BATCH")
    )
    p.add_argument("--fps", type=float, default=8.0, help="sampling rate of the training frames")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--batches", type=int, default=24, help="batches timed per loader (after one warm-up)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


@contextlib.contextmanager
def radosgw_storage() -> Iterator[Storage]:
    """Storage on the local radosgw (infra/local/radosgw.sh, its SVD_RGW_* settings). A gateway that was
    already running is left running; one started here is stopped on the way out, error or not."""
    was_running = answering(_radosgw("env")["AWS_ENDPOINT_URL_S3"])
    try:
        env = _radosgw("start")
        os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
        yield Storage.from_env(env)
    finally:
        if not was_running:
            _radosgw("stop")


def _radosgw(command: str) -> dict[str, str]:
    """Runs infra/local/radosgw.sh `command`; returns the variables it exports."""
    done = subprocess.run([str(ROOT / "infra/local/radosgw.sh"), command], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"infra/local/radosgw.sh {command} failed: {done.stderr.strip()[-2000:]}")
    exports = (line.removeprefix("export ") for line in done.stdout.splitlines())
    return dict(line.split("=", 1) for line in exports if "=" in line)


def answering(endpoint: str) -> bool:
    """Whether an HTTP server answers at `endpoint` (any status counts)."""
    try:
        urllib.request.urlopen(endpoint, timeout=2).close()
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


def build_corpus(args: argparse.Namespace, storage: Storage, local: Path) -> tuple[str, str, list[dict]]:
    """Videos on local disk and on S3; a table of many clip rows over them, as Lance and as Parquet."""
    bucket = f"bench-{int(time.time())}"
    create_bucket(storage, bucket)
    fs, _ = storage.fsspec(f"s3://{bucket}")
    height, width = args.video_size
    frames = round(args.seconds * args.source_fps)
    for v in range(args.videos):
        data = encode_mp4(
            panning_texture(frames, height, width, velocity=(0.3, 2.0 + v % 3), seed=v),
            args.source_fps,
            gop=int(args.source_fps),
        )
        (local / f"v{v}.mp4").write_bytes(data)
        fs.pipe_file(f"{bucket}/raw/v{v}.mp4", data)
    rng = np.random.default_rng(args.seed)
    words = np.array(CAPTION_TEXT.split())

    def caption() -> str:  # LVD keeps three captions per clip (CoCa, VideoBLIP, an LLM summary): ~200 chars
        return " ".join(rng.choice(words, 32))

    clip_s = (args.bucket[2] - 1) / args.fps + 1.0
    videos = rng.integers(0, args.videos, args.rows)
    starts = rng.uniform(0, args.seconds - clip_s, args.rows)
    rows = [
        {
            "clip_id": f"c{i}",
            "video_uri": f"s3://{bucket}/raw/v{v}.mp4",
            "start_s": float(s),
            "end_s": float(s + clip_s),
            "fps": args.source_fps,
            "width": width,
            "height": height,
            "num_frames": round(clip_s * args.source_fps),
            "captions": [caption(), caption(), caption()],
            "motion_score": 0.5,
            "aesthetic_score": 5.0,
            "clip_score": 0.3,
            "text_area": 0.0,
            "camera_motion": "pan_right",
            "source": "bench",
            "split": "train",
        }
        for i, (v, s) in enumerate(zip(videos.tolist(), starts.tolist(), strict=True))
    ]
    lance_uri = f"s3://{bucket}/clips.lance"
    write_clip_table(lance_uri, rows, storage)
    pa_fs, path = storage.pyarrow(f"s3://{bucket}/clips.parquet")
    pq.write_table(to_arrow(rows), path, filesystem=pa_fs)  # pyarrow's defaults, as a curation job would
    return lance_uri, f"s3://{bucket}/clips.parquet", rows


def decode(source, row: dict, bucket: Bucket, offset: float) -> np.ndarray:
    return decode_clip(
        source,
        start_s=row["start_s"],
        end_s=row["end_s"],
        num_frames=bucket.frames,
        fps=bucket.fps,
        size=(bucket.height, bucket.width),
        offset=offset,
    ).frames


def order(n: int, count: int, seed: int) -> np.ndarray:
    """The rows the loader reads first (one bucket; rows are in table order)."""
    return stream_indices(np.arange(count), n, seed)


def decode_limit(rows: list[dict], local: Path, bucket: Bucket, sequence: np.ndarray) -> float:
    start = time.perf_counter()
    for row in sequence.tolist():
        decode(str(local / Path(rows[row]["video_uri"]).name), rows[row], bucket, 0.5)
    return len(sequence) / (time.perf_counter() - start)


class ParquetClips(torch.utils.data.Dataset):
    """The baseline: metadata rows by index from Parquet on S3 (pyarrow), clips from S3 (fsspec)."""

    def __init__(self, uri: str, storage: Storage, bucket: Bucket, sequence: np.ndarray):
        self.uri, self.storage, self.bucket = uri, storage, bucket
        self.sequence = sequence.reshape(-1, bucket.batch_size)
        self._dataset = None

    def __len__(self) -> int:
        return len(self.sequence)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self._dataset is None:
            pa_fs, path = self.storage.pyarrow(self.uri)
            self._dataset = pads.dataset(path, filesystem=pa_fs, format="parquet")
        meta = self._dataset.take(pa.array(self.sequence[i])).to_pylist()
        clips = []
        for row in meta:
            with self.storage.reader(row["video_uri"]) as f:
                clips.append(torch.from_numpy(decode(f, row, self.bucket, 0.5)))
        return torch.stack(clips)


def clips_per_second(batches, count: int, batch_size: int) -> float:
    iterator = iter(batches)
    next(iterator)  # warm-up: worker start, first connections
    start = time.perf_counter()
    for _ in itertools.islice(iterator, count):
        pass
    return count * batch_size / (time.perf_counter() - start)


def time_breakdown(
    lance_uri: str, storage: Storage, rows: list[dict], bucket: Bucket, sequence: np.ndarray
) -> dict:
    """Where one in-process loader spends its time per clip: metadata take, opening the object, decoding."""
    table = open_table(lance_uri, storage)
    spent = {"take": [], "open": [], "decode": []}
    for batch in sequence[: 8 * bucket.batch_size].reshape(-1, bucket.batch_size):
        t0 = time.perf_counter()
        metas = table.take(batch.tolist(), columns=["video_uri", "start_s", "end_s"]).to_pylist()
        spent["take"].append((time.perf_counter() - t0) / len(batch))
        for meta in metas:
            t1 = time.perf_counter()
            f = storage.reader(meta["video_uri"])
            t2 = time.perf_counter()
            decode(f, meta, bucket, 0.5)
            t3 = time.perf_counter()
            spent["open"].append(t2 - t1)
            spent["decode"].append(t3 - t2)
    return {k: statistics.median(v) * 1e3 for k, v in spent.items()}


def main() -> None:
    args = parse_args()
    warnings.filterwarnings(
        "ignore", message="This DataLoader will create"
    )  # more workers than cores: asked for
    bucket = Bucket(*args.bucket, fps=args.fps)
    with radosgw_storage() as storage, tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp)
        print(
            f"corpus: {args.videos} videos {args.video_size[1]}×{args.video_size[0]} @ {args.source_fps:g} "
            f"fps, {args.rows} clip rows; bucket {bucket.frames}×{bucket.height}×{bucket.width} @ "
            f"{bucket.fps:g} fps, batch {bucket.batch_size}, {args.workers} workers"
        )
        lance_uri, parquet_uri, rows = build_corpus(args, storage, local)
        count = (args.batches + 1) * bucket.batch_size
        sequence = order(len(rows), count, args.seed)

        limit = decode_limit(rows, local, bucket, sequence[bucket.batch_size :])
        config = LoaderConfig(
            table=lance_uri,
            buckets=(bucket,),
            num_workers=args.workers,
            seed=args.seed,
            cache_dir=str(local / "rows"),
            prefetch_factor=4,
        )
        ours = clips_per_second(
            ClipLoader(config, storage=storage, rank=0, world_size=1), args.batches, bucket.batch_size
        )
        in_process = clips_per_second(
            ClipLoader(
                config.__class__(**{**config.__dict__, "num_workers": 0}),
                storage=storage,
                rank=0,
                world_size=1,
            ),
            args.batches,
            bucket.batch_size,
        )
        parquet = torch.utils.data.DataLoader(
            ParquetClips(parquet_uri, storage, bucket, sequence),
            batch_size=None,
            num_workers=args.workers,
            multiprocessing_context="spawn",
            prefetch_factor=4,
        )
        baseline = clips_per_second(parquet, args.batches, bucket.batch_size)
        breakdown = time_breakdown(lance_uri, storage, rows, bucket, sequence)

    print(f"decode limit (local files, 1 process): {limit:7.1f} clips/s")
    print(f"ClipLoader, {args.workers} workers (radosgw):      {ours:7.1f} clips/s")
    print(f"ClipLoader, in process (radosgw):      {in_process:7.1f} clips/s")
    print(f"Parquet + fsspec, {args.workers} workers (radosgw): {baseline:7.1f} clips/s")
    print(f"ratio ours/decode limit: {ours / limit:.2f}   (in process: {in_process / limit:.2f})")
    print(f"ratio ours/Parquet:      {ours / baseline:.2f}")
    print("per clip, in process: " + ", ".join(f"{k} {v:.1f} ms" for k, v in breakdown.items()))


if __name__ == "__main__":
    main()
