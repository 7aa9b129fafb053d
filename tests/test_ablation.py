"""The curation ablation: its recipes and sweep as planned, and end to end on a tiny model (two recipes, one
keeping static clips and one moving ones: both trained, both evaluated on the same conditions, compared, and
an arena of their samples written; a rerun reuses all of it)."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

from svd.ablation import AblateSettings, Ablation, AblationError, recipes_of, sweep_recipes
from svd.arena.catalog import Catalog
from svd.config import ConfigError
from svd.curate.recipes import PercentileRule
from svd.data.storage import Storage
from svd.data.table import write_clip_table

from .settings import production_settings

ROOT = Path(__file__).resolve().parents[1]
EVAL = [
    "eval=motion_adherence",
    "eval.samples=2",
    "eval.shard_size=2",
    "eval.frames=4",
    "eval.fps=4",
    "eval.sampler_steps=2",
    "eval.motion_buckets=[16,255]",
]


def test_a_sweep_drops_each_share_of_the_lowest_scored_clips():
    recipes = sweep_recipes("aesthetic_score:0.25,0.5")
    assert [r.name for r in recipes] == ["aesthetic_score-drop0.25", "aesthetic_score-drop0.5"]
    assert [r.rules for r in recipes] == [
        (PercentileRule("aesthetic_score", "lowest", 0.25),),
        (PercentileRule("aesthetic_score", "lowest", 0.5),),
    ]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (AblateSettings(recipes=["lvd_f"]), "at least 2 recipes"),
        (AblateSettings(recipes=["lvd_f", "lvd_f"]), "'lvd_f' is given twice"),
        (AblateSettings(recipes=["lvd_x", "lvd_f"]), "'lvd_x' is not a dataset card"),
        (AblateSettings(sweep="aesthetic_score"), "write <score>:<share>"),
        (AblateSettings(sweep="beauty:0.5,0.6"), "recipe rule column 'beauty'"),
        (AblateSettings(sweep="aesthetic_score:0.5,1.5"), "fraction=1.5 must be in [0, 1)"),
    ],
)
def test_recipes_that_cannot_be_compared_are_named(settings, message):
    with pytest.raises(
        ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")
    ):
        recipes_of(settings)


def test_cards_unfiltered_and_a_sweep_combine_in_order():
    names = [
        r.name for r in recipes_of(AblateSettings(recipes=["lvd_f", "unfiltered"], sweep="clip_score:0.5"))
    ]
    assert names == ["lvd_f", "unfiltered", "clip_score-drop0.5"]


@pytest.mark.slow
def test_two_recipes_train_evaluate_compare_and_make_an_arena_and_a_rerun_reuses_them(
    train_table, moto_s3, s3_env, tmp_path, capsys
):
    rows = [dict(r) for r in train_table["rows"]]
    for i, row in enumerate(rows):
        row["motion_score"] = (0.1 if row["camera_motion"] == "static" else 4.0) + 0.01 * i
    table = f"{train_table['bucket']}/scored.lance"
    write_clip_table(table, rows, moto_s3.storage)
    cards = {}
    for name, where in (("static", "motion_score < 1"), ("moving", "motion_score >= 1")):
        cards[name] = tmp_path / f"{name}.yaml"
        cards[name].write_text(f"name: {name}\nrecipe:\n  where: ['{where}']\n")
    train = [
        s
        for s in production_settings(table, "unused", "stage=video_pretrain")
        if not s.startswith(("data.table", "checkpoint.run_dir"))
    ]
    out = f"{train_table['bucket']}/ablation"
    argv = [
        f"table={table}",
        f"recipes=[{cards['static']},{cards['moving']}]",
        "steps=4",
        f"out={out}",
        *train,
        *EVAL,
    ]
    main = runpy.run_path(str(ROOT / "jobs" / "ablate.py"))["main"]

    assert main(argv) == 0, capsys.readouterr().err
    first = capsys.readouterr().out
    fs, path = moto_s3.storage.fsspec(out)
    summary = json.loads(fs.cat_file(f"{path}/comparison.json"))
    by_name = {r["name"]: r for r in summary["recipes"]}
    static_rows = sum(r["camera_motion"] == "static" for r in rows)
    assert (by_name["static"]["kept"], by_name["moving"]["kept"]) == (static_rows, len(rows) - static_rows)
    assert by_name["static"]["filter"] == "(motion_score < 1)"
    for recipe in by_name.values():
        assert -1 <= recipe["metrics"]["spearman_rho"] <= 1
        config = fs.cat_file(f"{path}/runs/{recipe['name']}/config.yaml").decode()
        assert "steps: 4" in config
        assert "seed: 0" in config
    assert fs.cat_file(f"{path}/comparison.png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert "static" in fs.cat_file(f"{path}/comparison.txt").decode()

    catalog = Catalog.load(f"{out}/arena", moto_s3.storage)
    assert catalog.models == ["static", "moving"]
    assert len(catalog.pairs) == 4  # 2 conditions × 2 motion buckets, one pair of models
    samples = {}
    for name, folder in zip(catalog.models, catalog.folders, strict=True):
        import lance

        uri = f"{folder}/samples.lance"
        samples[name] = (
            lance.dataset(uri, storage_options=moto_s3.storage.lance_options(uri)).to_table().to_pylist()
        )
    conditions = {
        n: sorted((r["condition"], r["seed"], r["clip_id"]) for r in rs) for n, rs in samples.items()
    }
    assert conditions["static"] == conditions["moving"]  # the same held-out clips, whatever the filter kept

    assert main(argv) == 0
    again = capsys.readouterr().out
    assert again.count("trained already") == 2
    assert again.count("evaluated already") == 2
    assert json.loads(fs.cat_file(f"{path}/comparison.json")) == summary
    assert "static" in first


def test_an_ablation_of_another_table_in_the_same_folder_is_refused(tmp_path, local_table):
    settings = AblateSettings(
        table=local_table,
        recipes=["unfiltered"],
        sweep="motion_score:0.5",
        steps=1,
        eval="motion_adherence",
        out=str(tmp_path),
    )
    (tmp_path / "plan.json").write_text(json.dumps({"table": "s3://other/clips.lance", "recipes": {}}))
    with pytest.raises(ConfigError, match=r"is an ablation of s3://other/clips\.lance"):
        Ablation(settings, [], [], Storage()).plan()


def test_every_recipe_is_launched_before_unfinished_trainings_are_reported(
    tmp_path, local_table, monkeypatch
):
    """A launcher that submits without waiting (Slurm, launcher.wait=false) trains the recipes side by side:
    the ablation launches all of them, then says which are not finished, instead of stopping at the first."""
    import types

    import svd.launch

    launched = []
    submit_only = types.SimpleNamespace(launch=lambda cfg: launched.append(cfg.checkpoint.run_dir) or 0)
    monkeypatch.setattr(svd.launch, "launcher_module", lambda name: submit_only)
    card = tmp_path / "first_half.yaml"
    card.write_text("name: first_half\nrecipe:\n  where: ['start_s < 1']\n")
    settings = AblateSettings(
        table=local_table,
        recipes=["unfiltered", str(card)],
        steps=2,
        eval="motion_adherence",
        out=str(tmp_path),
    )
    ablation = Ablation(settings, ["model=tiny"], [], Storage())
    with pytest.raises(AblationError, match="training of unfiltered, first_half not finished"):
        ablation.run()
    assert launched == [f"{tmp_path}/runs/unfiltered", f"{tmp_path}/runs/first_half"]
    plan = json.loads((tmp_path / "plan.json").read_text())["recipes"]
    assert plan["unfiltered"]["filter"] == "true"
    assert plan["first_half"]["filter"] == "(start_s < 1)"
    assert plan["first_half"]["kept"] < plan["unfiltered"]["kept"] == plan["unfiltered"]["total"]


def test_help_describes_the_ablation_and_its_arena(capsys):
    main = runpy.run_path(str(ROOT / "jobs" / "ablate.py"))["main"]
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "sweep=<score>:<shares>" in out
    assert "jobs/arena.py" in out
