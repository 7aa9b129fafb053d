import json
from pathlib import Path

import numpy as np
import pytest

from svd.curate.recipes import PercentileRule, Recipe, compute_filter, load_recipe, save
from svd.curate.report import write_report
from svd.data.storage import Storage
from svd.data.synthetic import moving_square
from svd.data.table import write_clip_table
from svd.data.video_io import write_mp4

ROOT = Path(__file__).resolve().parents[2]
N = 400


@pytest.fixture(scope="module")
def scored_table(tmp_path_factory):
    """N clips with independent uniform scores, all pointing at one real video."""
    folder = tmp_path_factory.mktemp("scored")
    video = str(write_mp4(moving_square(48, 36, 64), folder / "v.mp4", fps=24))
    rng = np.random.default_rng(0)
    scores = {name: rng.random(N) for name in ("motion_score", "aesthetic_score", "clip_score", "text_area")}
    scores["text_area"] *= 0.1
    rows = [
        {
            "clip_id": f"c{i}",
            "video_uri": video,
            "start_s": 0.0,
            "end_s": 2.0,
            "fps": 24.0,
            "width": 64,
            "height": 36,
            "num_frames": 48,
            "captions": ["x"],
            "camera_motion": ["static", "pan_left"][i % 2],
            "source": "test",
            "split": "train",
            **{k: float(v[i]) for k, v in scores.items()},
        }
        for i in range(N)
    ]
    uri = str(folder / "clips.lance")
    write_clip_table(uri, rows, Storage())
    return uri, scores


def test_lvd_f_thresholds_are_the_tables_percentiles(scored_table):
    uri, scores = scored_table
    result = compute_filter(uri, load_recipe(ROOT / "datasets" / "lvd_f.yaml"), Storage())
    limits = {
        "motion_score": np.quantile(scores["motion_score"], 0.25),
        "aesthetic_score": np.quantile(scores["aesthetic_score"], 0.25),
        "clip_score": np.quantile(scores["clip_score"], 0.50),
        "text_area": np.quantile(scores["text_area"], 0.75),
    }
    keep = (
        (scores["motion_score"] >= limits["motion_score"])
        & (scores["aesthetic_score"] >= limits["aesthetic_score"])
        & (scores["clip_score"] >= limits["clip_score"])
        & (scores["text_area"] <= limits["text_area"])
        & (scores["text_area"] < 0.07)
    )
    assert result.kept == int(keep.sum())
    assert result.total == N
    # independent scores: 0.75 · 0.75 · 0.5 · (share of text ≤ min(p75, 0.07)) ≈ 0.2 of the clips
    assert 0.15 < result.kept / N < 0.25
    assert result.table_version == 1
    for column, value in limits.items():
        assert f"{column} " in result.filter
        assert any(v == pytest.approx(value) for k, v in result.thresholds.items() if k.startswith(column))


def test_the_stricter_finetune_recipe_keeps_fewer_clips(scored_table):
    uri, _ = scored_table
    lvd_f = compute_filter(uri, load_recipe(ROOT / "datasets" / "lvd_f.yaml"), Storage())
    hq = compute_filter(uri, load_recipe(ROOT / "datasets" / "lvd_hq.yaml"), Storage())
    assert hq.kept < lvd_f.kept


def test_the_filter_is_saved_beside_the_table_with_its_version(scored_table):
    uri, _ = scored_table
    result = compute_filter(uri, Recipe("half", (PercentileRule("clip_score", "lowest", 0.5),)), Storage())
    path = save(result, Storage())
    assert path.endswith("clips.recipes/half-v1.json")
    saved = json.loads(Path(path).read_text())
    assert saved["filter"] == result.filter
    assert saved["kept"] == N // 2


def test_bad_rules_are_named():
    with pytest.raises(ValueError, match="beauty"):
        PercentileRule("beauty", "lowest", 0.5)
    with pytest.raises(ValueError, match="drop='middle'"):
        PercentileRule("clip_score", "middle", 0.5)


def test_the_report_shows_counts_scores_thresholds_and_samples(scored_table, tmp_path):
    uri, _ = scored_table
    path = write_report(uri, tmp_path, Storage(), load_recipe(ROOT / "datasets" / "lvd_f.yaml"), samples=4)
    text = path.read_text()
    assert f"clips: {N}" in text
    assert "Recipe `lvd_f`" in text
    assert "Kept " in text
    for image in ("scores.png", "camera_motion.png", "contact_sheet.png"):
        assert (tmp_path / image).stat().st_size > 5_000
        assert f"({image})" in text
