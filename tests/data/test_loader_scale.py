"""The loader's memory does not grow with the table: a 10M-row clip table (LVD-F has 152M).

Measured in a fresh process: start-up (table open, filter scan, row index) and the first batch, with the
resident-memory growth and peak above the process's level after imports.
"""

import json
import subprocess
import sys

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from svd.data.schema import clip_schema
from svd.data.synthetic import moving_square
from svd.data.video_io import write_mp4

ROWS = 10_000_000

CHILD = r"""
import json, sys, time
from svd.data.buckets import Bucket
from svd.data.loader import ClipLoader, LoaderConfig

def kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))

table, cache = sys.argv[1], sys.argv[2]
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak to the current size: measure the loader, not the imports
base = kib("VmRSS")
start = time.perf_counter()
loader = ClipLoader(LoaderConfig(table=table, buckets=(Bucket(16, 16, 4, 8, fps=4),), num_workers=0,
                                 filter="motion_score > 0.5", cache_dir=cache))
batch = next(iter(loader))
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "rss_mib": (kib("VmRSS") - base) / 1024,
                  "peak_mib": (kib("VmHWM") - base) / 1024, "rows": loader.sizes[0],
                  "batch": list(batch["frames"].shape)}))
"""


@pytest.fixture(scope="module")
def ten_million_rows(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scale")
    video = write_mp4(moving_square(16, 16, 16), folder / "v.mp4", fps=8)
    rng = np.random.default_rng(0)
    schema = clip_schema()

    def batches(chunk=1_000_000):
        for start in range(0, ROWS, chunk):
            ids = pa.array(np.arange(start, start + chunk))
            columns = {
                "clip_id": pc.binary_join_element_wise("clip-", ids.cast(pa.string()), ""),
                "video_uri": pa.repeat(str(video), chunk),
                "start_s": np.zeros(chunk),
                "end_s": np.full(chunk, 2.0),
                "fps": np.full(chunk, 8, np.float32),
                "width": np.full(chunk, 16, np.int32),
                "height": np.full(chunk, 16, np.int32),
                "num_frames": np.full(chunk, 16, np.int32),
                "captions": pa.nulls(chunk, pa.list_(pa.string())),
                "motion_score": rng.random(chunk, np.float32),
                "aesthetic_score": rng.random(chunk, np.float32),
                "clip_score": rng.random(chunk, np.float32),
                "text_area": rng.random(chunk, np.float32),
                "camera_motion": pa.repeat("static", chunk),
                "source": pa.repeat("synthetic", chunk),
                "split": pa.repeat("train", chunk),
            }
            yield pa.RecordBatch.from_arrays(
                [pa.array(columns[f.name], f.type) for f in schema], schema=schema
            )

    uri = str(folder / "big.lance")
    lance.write_dataset(pa.RecordBatchReader.from_batches(schema, batches()), uri)
    return uri, folder


@pytest.mark.slow
def test_ten_million_rows_start_fast_in_bounded_memory(ten_million_rows):
    uri, folder = ten_million_rows
    out = subprocess.run(
        [sys.executable, "-c", CHILD, uri, str(folder / "cache")], capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"10M rows: {result}")
    assert result["batch"] == [8, 4, 3, 16, 16]
    assert 4_900_000 < result["rows"] < 5_100_000  # the filter kept about half
    assert result["seconds"] < 30
    assert result["peak_mib"] < 300
    assert result["rss_mib"] < 300
