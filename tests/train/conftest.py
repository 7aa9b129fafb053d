"""A clip table on the S3 server for training tests: videos (train and val split) and still images, and a
tiny CLIP saved in the Hugging Face layout, loaded by the same code as real encoders."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from svd.data.storage import join
from svd.data.synthetic import synthetic_corpus
from svd.data.table import write_clip_table


@pytest.fixture(scope="session")
def train_table(moto_s3) -> dict:
    """12 clips of 6 videos (3 s at 8 fps, 32×48; camera_motion alternates static/zoom_in), 2 of them in
    the val split, and 4 still images."""
    bucket = f"s3://{moto_s3.new_bucket()}"
    rows = synthetic_corpus(f"{bucket}/raw", moto_s3.storage, videos=6, seconds=3.0, clip_seconds=1.5)
    for i, row in enumerate(rows):
        row["camera_motion"] = ("static", "zoom_in")[i % 2]
    rows[0]["split"] = rows[5]["split"] = "val"
    rng = np.random.default_rng(0)
    for i in range(4):
        uri = join(bucket, "raw", f"image_{i}.png")
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        fs, path = moto_s3.storage.fsspec(uri)
        fs.pipe_file(path, buffer.getvalue())
        rows.append(
            rows[1]
            | {
                "clip_id": f"image_{i}",
                "video_uri": uri,
                "start_s": 0.0,
                "end_s": 0.0,
                "width": 32,
                "height": 32,
                "num_frames": 1,
                "captions": [f"image {i}"],
                "split": "train",
            }
        )
    table = f"{bucket}/clips.lance"
    write_clip_table(table, rows, moto_s3.storage)
    return {"table": table, "bucket": bucket, "rows": rows}


@pytest.fixture
def s3_env(moto_s3, monkeypatch) -> dict[str, str]:
    """The S3 server in this process's environment (and so in every rank it starts)."""
    for key, value in moto_s3.env.items():
        monkeypatch.setenv(key, value)
    return moto_s3.env


@pytest.fixture(scope="session")
def tiny_clip_encoder(tiny_clip_factory) -> str:
    """Text hidden size and image projection 32 = the tiny UNet's context_dim; 224 px, the size the diffusers
    pipeline feeds its image encoder."""
    return tiny_clip_factory("tiny_clip32", image_size=224, patch_size=56, projection_dim=32)
