import numpy as np
import pytest

from svd.data.buckets import Bucket, assign, choose

BUCKETS = (
    Bucket(256, 384, 14, 4, fps=8),  # landscape video
    Bucket(384, 256, 14, 4, fps=8),  # portrait video
    Bucket(256, 256, 1, 32),  # images
)


def rows(width, height, frames, fps, duration):
    return {
        k: np.asarray(v)
        for k, v in {
            "width": width,
            "height": height,
            "num_frames": frames,
            "fps": fps,
            "duration": duration,
        }.items()
    }


def test_rows_go_to_the_closest_aspect_ratio_they_can_fill():
    assigned = assign(
        BUCKETS,
        **rows(
            width=[640, 360, 500, 640, 640],
            height=[360, 640, 500, 360, 360],
            frames=[300, 300, 1, 10, 300],
            fps=[30, 30, 0, 30, 4],
            duration=[10, 10, 0, 0.33, 3.0],
        ),
    )
    # landscape, portrait, image, too short for 14 frames, slow source: 14 frames at 4 fps need 3.25 s
    assert assigned.tolist() == [0, 1, 2, -1, -1]


def test_choice_is_the_same_for_the_same_state_and_proportional_to_size():
    sizes = (300, 100, 0)
    states = [(i, 4, 0) for i in range(200)]
    first = [choose(1, state, sizes) for state in states]
    np.random.seed(123)  # the global generators' state must not matter
    np.random.random(7)
    assert [choose(1, state, sizes) for state in reversed(states)] == first[::-1]
    assert [choose(2, state, sizes) for state in states] != first  # the seed does matter
    picks = [choose(1, (i, 0, 0), sizes) for i in range(4000)]
    assert 2 not in picks  # an empty bucket is never chosen
    assert np.mean(np.array(picks) == 0) == pytest.approx(0.75, abs=0.03)


@pytest.mark.parametrize("field", ["height", "frames", "batch_size"])
def test_invalid_bucket_is_named(field):
    with pytest.raises(ValueError, match=field):
        Bucket(**{"height": 8, "width": 8, "frames": 1, "batch_size": 1, field: 0})
