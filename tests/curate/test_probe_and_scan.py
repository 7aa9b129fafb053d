import io

import numpy as np
import pytest
from PIL import Image

from svd.curate.probe import RejectionError, probe
from svd.curate.scan import grab_frames, scan
from svd.data.synthetic import moving_square
from svd.data.video_io import encode_mp4


@pytest.fixture(scope="module")
def video() -> bytes:
    return encode_mp4(
        moving_square(48, 36, 64, color=(255, 0, 0), velocity=(0.0, 1.0), start=(10.0, 0.0)), 24
    )


def test_probe_reads_duration_rate_size_and_codec(video):
    info = probe(io.BytesIO(video))
    assert info.duration_s == pytest.approx(2.0, abs=0.05)
    assert (info.fps, info.width, info.height, info.codec) == (24, 64, 36, "h264")
    assert not info.is_image


def test_an_avi_is_probed_as_a_video_not_as_a_webp_image(avi_bytes):
    assert (avi_bytes[:4], avi_bytes[8:12]) == (b"RIFF", b"AVI ")
    info = probe(io.BytesIO(avi_bytes))
    assert not info.is_image
    assert (info.fps, info.width, info.height, info.codec) == (24, 64, 48, "mpeg4")
    assert info.duration_s == pytest.approx(2.0, abs=0.05)


def test_probe_recognises_images():
    png = io.BytesIO()
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(png, format="PNG")
    png.seek(0)
    info = probe(png)
    assert info.is_image
    assert (info.width, info.height) == (40, 30)
    webp = io.BytesIO()
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(webp, format="WEBP")
    webp.seek(0)
    assert probe(webp).is_image


@pytest.mark.parametrize(
    ("data", "kwargs", "reason"),
    [
        (b"not a video at all" * 50, {}, "unreadable"),
        (None, {"min_duration_s": 5.0}, "too_short"),
        (None, {"max_duration_s": 1.0}, "too_long"),
    ],
)
def test_probe_rejects_with_a_reason(video, data, kwargs, reason):
    with pytest.raises(RejectionError) as raised:
        probe(io.BytesIO(data or video), **kwargs)
    assert raised.value.reason == reason


def test_scan_keeps_every_frame_small_and_motion_frames_at_2_fps(video):
    result = scan(io.BytesIO(video))
    assert result.thumbnails.shape[0] == 48
    assert result.thumbnails.shape[-1] == 3
    assert result.thumbnails.shape[2] <= 64
    assert len(result.motion_times) == 4  # 0, 0.5, 1.0, 1.5 s
    np.testing.assert_allclose(np.diff(result.motion_times), 0.5, atol=1e-6)
    assert min(result.motion_frames.shape[1:]) == 16


def test_grab_frames_returns_the_frames_at_the_requested_times(video):
    frames = grab_frames(io.BytesIO(video), [0.0, 1.0, 1.9], short_side=36, seek_ahead_s=0.1)
    lefts = []
    for frame in frames:
        red = ((frame[..., 0] > 180) & (frame[..., 1] < 110)).any(axis=0)
        lefts.append(int(np.nonzero(red)[0].min()))
    assert lefts == pytest.approx([0, 24, 45], abs=1)  # frames 0, 24 and 46 (the square moves 1 px/frame)
