"""Cut detection on generated videos whose transitions are known frame by frame."""

import io

import numpy as np
import pytest

from svd.curate.cuts import (
    CutConfig,
    Transition,
    clips_between,
    detect_transitions,
    gaps,
    score_boundaries,
)
from svd.curate.scan import scan
from svd.data.synthetic import panning_texture, video_with_cuts
from svd.data.video_io import encode_mp4

from .conftest import FPS, H, W, shots_video


def transitions_of(frames: np.ndarray) -> list[Transition]:
    return detect_transitions(scan(io.BytesIO(encode_mp4(frames, FPS))).thumbnails, FPS)


# Shots: a pan over a texture, a zoom on another texture, a moving square. (A dissolve between the two
# textures is invisible to any pixel-difference detector: same statistics, constant motion.)
@pytest.mark.parametrize(
    "transitions",
    [
        (("cut", 0), ("cut", 0)),
        (("cut", 0), ("dissolve", 12)),
        (("fade", 16), ("dissolve", 24)),
        (("cut", 0), ("fade", 24)),
    ],
)
def test_hard_cuts_dissolves_and_fades_are_found(transitions):
    frames, truth = shots_video(transitions=transitions)
    found = transitions_of(frames)
    assert score_boundaries(found, truth) == (2, 0, 0)


def test_a_hard_cut_is_placed_on_the_exact_frame():
    frames, truth = shots_video(transitions=(("cut", 0), ("cut", 0)))
    found = transitions_of(frames)
    assert [t.first for t in found] == [start for start, _ in truth]
    assert all(t.last == t.first - 1 for t in found)  # a hard cut occupies no frame


def test_camera_motion_alone_is_not_a_cut():
    frames, _ = shots_video(lengths=(240,), transitions=())
    assert transitions_of(frames) == []


def test_clips_lie_between_transitions_and_respect_the_minimum_length():
    transitions = [Transition(48, 47), Transition(100, 111), Transition(130, 129)]
    cfg = CutConfig(min_clip_s=1.0)
    # [0, 48) 2 s, [48, 100) 2.2 s, [112, 130) 0.75 s (too short), [130, 240) 4.6 s
    assert clips_between(transitions, 240, FPS, cfg) == [(0, 48), (48, 100), (130, 240)]


def test_long_clips_are_split_evenly():
    cfg = CutConfig(min_clip_s=1.0, max_clip_s=2.0)
    assert clips_between([], 120, FPS, cfg) == [(0, 40), (40, 80), (80, 120)]


def test_a_boundary_within_three_frames_of_a_hard_cut_finds_it_and_one_further_off_is_a_false_positive():
    truth = [(100, 100)]
    assert score_boundaries([Transition(103, 102)], truth) == (1, 0, 0)
    assert score_boundaries([Transition(97, 96)], truth) == (1, 0, 0)
    assert score_boundaries([Transition(104, 103)], truth) == (0, 1, 1)


def test_a_dissolve_is_found_by_boundaries_within_half_its_length_plus_three_frames_of_its_centre():
    truth = [(100, 119)]  # 20 frames, centre 110: boundaries 97..123 match
    assert score_boundaries([Transition(100, 119)], truth) == (1, 0, 0)  # both ends, one transition
    assert score_boundaries([Transition(110, 109)], truth) == (1, 0, 0)  # a cut in the middle
    assert score_boundaries([Transition(97, 122)], truth) == (1, 0, 0)
    assert score_boundaries([Transition(96, 122)], truth) == (1, 1, 0)  # a clip ends too early
    assert score_boundaries([Transition(90, 130)], truth) == (0, 2, 1)  # a clip dropped for nothing


def test_a_second_detection_of_a_found_transition_and_a_boundary_near_none_are_false_positives():
    detected = [Transition(10, 9), Transition(12, 11), Transition(50, 60), Transition(200, 199)]
    assert score_boundaries(detected, [(10, 10), (52, 58), (100, 100)]) == (2, 2, 1)


def test_gaps_are_the_frames_between_consecutive_clips():
    assert gaps([(0, 48), (48, 100), (112, 130)]) == [Transition(48, 47), Transition(100, 111)]


def test_a_cut_from_a_fast_pan_into_a_still_shot_is_one_exact_cut():
    # The running median of d1 is the still shot's zero for most of a short pan before it, so each of the
    # pan's steps stands out from it; only the cut stands out from its neighbours as well.
    pan = panning_texture(30, H, W, velocity=(0.0, 6.0), seed=1)
    still = panning_texture(100, H, W, velocity=(0.0, 0.0), seed=2)
    frames, truth = video_with_cuts([pan, still], [("cut", 0)])
    assert transitions_of(frames) == [Transition(truth[0][0], truth[0][0] - 1)]


def test_a_transition_longer_than_a_shot_is_refused_by_its_place_and_lengths():
    shots = [panning_texture(n, 16, 16, velocity=(0.0, 1.0), seed=n) for n in (20, 12, 20)]
    with pytest.raises(ValueError, match="around transition 1 have 2 and 20 left"):
        video_with_cuts(shots, [("dissolve", 10), ("fade", 10)])
