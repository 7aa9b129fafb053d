"""Decoding against generated videos whose content is known frame by frame."""

import io

import lance
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from svd.data.synthetic import moving_square
from svd.data.video import DecodeError, decode_clip, resize_crop_size, sample_times
from svd.data.video_io import encode_mp4

FPS, FRAMES, H, W = 8, 24, 32, 48
RED = (255, 0, 0)


@pytest.fixture(scope="module")
def video_bytes() -> bytes:
    return encode_mp4(
        moving_square(FRAMES, H, W, color=RED, velocity=(0.0, 2.0), start=(8.0, 0.0)), FPS, gop=FPS
    )


@pytest.fixture
def video_path(tmp_path, video_bytes) -> str:
    path = tmp_path / "v.mp4"
    path.write_bytes(video_bytes)
    return str(path)


def square_left(frame: np.ndarray) -> int:
    """Left edge of the red square, which wraps around the right border."""
    red = ((frame[..., 0] > 180) & (frame[..., 1] < 110)).any(axis=0)
    return int(np.nonzero(red & ~np.roll(red, 1))[0][0])


def test_frames_are_sampled_at_the_target_rate_from_the_start_time(video_path):
    clip = decode_clip(video_path, start_s=1.0, end_s=3.0, num_frames=4, fps=4, size=(H, W))
    assert clip.frames.shape == (4, H, W, 3)
    assert clip.fps == 4
    # frames at t = 1.0, 1.25, 1.5, 1.75 s are source frames 8, 10, 12, 14; the square moves 2 px per frame
    assert [square_left(f) for f in clip.frames] == pytest.approx([16, 20, 24, 28], abs=1)


def test_offset_moves_the_window_inside_the_clip(video_path):
    clip = decode_clip(video_path, start_s=0.0, end_s=3.0, num_frames=3, fps=8, size=(H, W), offset=1.0)
    # the last frame starts at 23/8 s: the window ends there, frames 21, 22, 23 (left = 42, 44, 46 → wraps)
    assert square_left(clip.frames[0]) == pytest.approx(42, abs=1)


def test_the_rate_never_exceeds_the_source(video_path):
    clip = decode_clip(video_path, start_s=0.0, end_s=3.0, num_frames=5, fps=30, size=(H, W))
    assert clip.fps == FPS
    assert np.diff([square_left(f) for f in clip.frames]) == pytest.approx([2, 2, 2, 2], abs=1)


def test_frames_are_resized_to_cover_then_center_cropped(video_path):
    clip = decode_clip(video_path, start_s=0.0, end_s=1.0, num_frames=2, fps=8, size=(16, 16))
    assert clip.frames.shape == (2, 16, 16, 3)
    assert resize_crop_size(W, H, 16, 16) == (24, 16)


def test_a_clip_too_short_for_the_request_is_reported(video_path):
    with pytest.raises(DecodeError) as raised:
        decode_clip(video_path, start_s=0.0, end_s=3.0, num_frames=30, fps=8, size=(H, W))
    assert raised.value.reason == "too_short"


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda data: data[: len(data) // 2], "corrupt"),  # truncated: the index (moov) is at the end
        (lambda data: np.random.default_rng(0).bytes(len(data)), "corrupt"),  # garbage
        (lambda data: b"", "corrupt"),  # empty object
    ],
)
def test_damaged_files_fail_with_a_reason(tmp_path, video_bytes, mangle, reason):
    path = tmp_path / "bad.mp4"
    path.write_bytes(mangle(video_bytes))
    with pytest.raises(DecodeError) as raised:
        decode_clip(str(path), start_s=0.0, end_s=3.0, num_frames=4, fps=4, size=(H, W))
    assert raised.value.reason == reason


def test_a_missing_file_is_reported_as_missing(tmp_path):
    with pytest.raises(DecodeError) as raised:
        decode_clip(str(tmp_path / "nope.mp4"), start_s=0, end_s=1, num_frames=1, fps=1, size=(8, 8))
    assert raised.value.reason == "missing"


def test_an_avi_is_decoded_as_a_video(tmp_path, avi_bytes):
    path = tmp_path / "v.avi"
    path.write_bytes(avi_bytes)  # starts with RIFF, like a WebP image
    clip = decode_clip(str(path), start_s=0.5, end_s=2.0, num_frames=4, fps=8, size=(H, W))
    assert clip.frames.shape == (4, H, W, 3)
    assert clip.fps == 8


def test_sample_times_fit_the_window():
    np.testing.assert_allclose(sample_times(1.0, 3.0, 3, 2.0, offset=0.5), [1.5, 2.0, 2.5])


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_images_take_the_same_call(tmp_path, fmt):
    image = np.zeros((40, 60, 3), np.uint8)
    image[:, 30:] = (0, 0, 255)
    path = tmp_path / f"i.{fmt.lower()}"
    Image.fromarray(image).save(path, format=fmt)
    clip = decode_clip(str(path), start_s=0, end_s=0, num_frames=1, fps=8, size=(20, 20))
    assert clip.frames.shape == (1, 20, 20, 3)
    assert clip.frames[0, :, -1, 2].mean() > 200  # right edge is blue, as in the source


def test_decoding_from_object_storage_and_from_a_lance_blob(moto_s3, s3_bucket, video_bytes, tmp_path):
    fs, path = moto_s3.storage.fsspec(f"{s3_bucket}/v.mp4")
    fs.pipe_file(path, video_bytes)
    with fs.open(path, "rb", block_size=1 << 16) as remote:
        from_s3 = decode_clip(remote, start_s=1.0, end_s=3.0, num_frames=4, fps=4, size=(H, W))
    blob = pa.field("clip_bytes", pa.large_binary(), metadata={"lance-encoding:blob": "true"})
    table = lance.write_dataset(
        pa.table({"clip_bytes": [video_bytes]}, schema=pa.schema([blob])), tmp_path / "b"
    )
    from_blob = decode_clip(
        table.take_blobs("clip_bytes", indices=[0])[0],
        start_s=1.0,
        end_s=3.0,
        num_frames=4,
        fps=4,
        size=(H, W),
    )
    local = decode_clip(io.BytesIO(video_bytes), start_s=1.0, end_s=3.0, num_frames=4, fps=4, size=(H, W))
    assert np.array_equal(from_s3.frames, local.frames)
    assert np.array_equal(from_blob.frames, local.frames)
