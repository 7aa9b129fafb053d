import io

import pytest

from svd.curate.motion import measure_motion
from svd.curate.scan import scan
from svd.data.synthetic import moving_square, panning_texture, zooming_texture
from svd.data.video_io import encode_mp4

from .conftest import FPS, H, W


def motion_of(frames):
    result = scan(io.BytesIO(encode_mp4(frames, FPS)))
    return measure_motion(result.motion_frames, 2.0)


@pytest.mark.parametrize(
    ("frames", "camera"),
    [
        (lambda: panning_texture(72, H, W, velocity=(0, 3)), "pan_right"),  # content moves left
        (lambda: panning_texture(72, H, W, velocity=(0, -3)), "pan_left"),
        (lambda: panning_texture(72, H, W, velocity=(2.5, 0)), "tilt_down"),
        (lambda: panning_texture(72, H, W, velocity=(-2.5, 0)), "tilt_up"),
        (lambda: zooming_texture(72, H, W, rate=0.015), "zoom_in"),
        (lambda: zooming_texture(72, H, W, rate=-0.015), "zoom_out"),
        (lambda: panning_texture(72, H, W, velocity=(0, 0)), "static"),
        (lambda: moving_square(72, H, W, velocity=(0, 3)), "static"),  # an object moves, the camera does not
    ],
)
def test_camera_motion_is_named_from_the_flow(frames, camera):
    assert motion_of(frames()).camera == camera


def test_motion_score_grows_with_speed_and_is_zero_when_still():
    still, slow, fast = (motion_of(panning_texture(72, H, W, velocity=(0, v))).score for v in (0.0, 1.0, 2.0))
    assert still < 0.01
    assert slow < fast
    # 2 px/frame on a 180-px short side at 24 fps: 48/180 ≈ 0.27 short sides per second
    assert fast == pytest.approx(48 / 180, rel=0.25)
