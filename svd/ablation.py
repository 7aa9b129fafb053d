"""A curation ablation, the paper's method for choosing data: one model per recipe, trained on the same budget
(steps × global batch) in the same global order seed, so only the filter differs; each evaluated by one
protocol; a comparison of them and an arena of their samples.

    <out>/plan.json                 each recipe's filter, pinned to the table version it was computed on
    <out>/runs/<recipe>/            the training run (checkpoints, config.yaml, eval/<protocol>/step-<N>/)
    <out>/comparison.{txt,png,json} the protocol's metrics of every recipe
    <out>/arena/                    jobs/arena.py's folder over the recipes' samples

Rerunnable: a recipe whose run has its last step saved is not trained again (a run stopped half way resumes
from its checkpoint), an evaluation with its metrics is not sampled again, and the filters of plan.json are
reused, so a table that changed meanwhile does not change a recipe under a finished run.

This sits above the launchers, the evaluation, curation's recipes and the arena (jobs/ablate.py → here →
svd.launch, svd.eval, svd.curate.recipes, svd.arena); none of them imports it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from svd.config import ConfigError, RunConfig, compose, validate
from svd.curate.recipes import PercentileRule, Recipe, compute_filter, load_recipe
from svd.data.storage import Storage, join, write_whole

DATASETS = Path(__file__).resolve().parents[1] / "datasets"
UNFILTERED = "unfiltered"


@dataclass
class AblateSettings:
    table: str = ""  # the scored clip table (any URI)
    recipes: list[str] = field(
        default_factory=list
    )  # dataset cards: a name in datasets/, a path, or unfiltered
    sweep: str = ""  # <score>:<share>,<share>…: one recipe per share of the lowest-scored clips dropped
    steps: int = 0  # optimizer steps of every run (the same budget: steps × train.global_batch samples)
    eval: str = ""  # the protocol every run is evaluated with (jobs/conf/eval/)
    out: str = ""  # default: <table>.ablations/<name>
    name: str = "ablation"


@dataclass(frozen=True)
class PlannedRecipe:
    name: str
    filter: str
    table_version: int
    kept: int
    total: int
    thresholds: dict[str, float]


def recipes_of(settings: AblateSettings) -> list[Recipe]:
    """The recipes to compare: the named cards, then the sweep's; names unique."""
    recipes = [_card(r) for r in settings.recipes] + sweep_recipes(settings.sweep)
    if len(recipes) < 2:
        raise ConfigError(
            "an ablation compares at least 2 recipes: give recipes=[a,b] and/or sweep=<score>:a,b"
        )
    names = [r.name for r in recipes]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"recipes: {twice[0]!r} is given twice")
    return recipes


def sweep_recipes(sweep: str) -> list[Recipe]:
    """`aesthetic_score:0.25,0.5` → recipes dropping the lowest-scored 25 % and 50 % of the clips."""
    if not sweep:
        return []
    column, _, shares = sweep.partition(":")
    if not shares:
        raise ConfigError(f"sweep={sweep!r}: write <score>:<share>,<share> (e.g. aesthetic_score:0.25,0.5)")
    recipes = []
    for share in shares.split(","):
        try:
            fraction = float(share)
            rule = PercentileRule(column, "lowest", fraction)
        except ValueError as e:
            raise ConfigError(f"sweep={sweep!r}: {e}") from None
        recipes.append(Recipe(f"{column}-drop{fraction:g}", (rule,)))
    return recipes


def _card(name: str) -> Recipe:
    if name == UNFILTERED:
        return Recipe(UNFILTERED, ())
    path = Path(name) if name.endswith((".yaml", ".yml")) else DATASETS / f"{name}.yaml"
    try:
        return load_recipe(path)
    except FileNotFoundError:
        raise ConfigError(
            f"recipes: {name!r} is not a dataset card (no {path}); give a name in datasets/, a path, "
            f"or {UNFILTERED}"
        ) from None
    except (ValueError, TypeError) as e:
        raise ConfigError(f"recipes: {path}: {' '.join(str(e).split())}") from None


class AblationError(Exception):
    """A training or evaluation of the ablation that did not finish; the message names the recipe."""


class Ablation:
    def __init__(
        self, settings: AblateSettings, train_args: list[str], eval_args: list[str], storage: Storage
    ):
        for key in ("table", "eval"):
            if not getattr(settings, key):
                raise ConfigError(f"{key}= is required (see --help)")
        if settings.steps < 1:
            raise ConfigError(f"steps={settings.steps} must be ≥ 1")
        from svd.eval.protocol import load_protocol

        self.settings, self.train_args, self.storage = settings, train_args, storage
        self.protocol = load_protocol(settings.eval, eval_args)
        self.recipes = recipes_of(settings)
        self.out = settings.out or join(
            settings.table.rstrip("/").removesuffix(".lance") + ".ablations", settings.name
        )

    def plan(self) -> list[PlannedRecipe]:
        """Each recipe's filter: from plan.json where an earlier run of this ablation wrote it, else now."""
        fs, path = self.storage.fsspec(join(self.out, "plan.json"))
        known = json.loads(fs.cat_file(path)) if fs.exists(path) else {}
        if known and known.get("table") != self.settings.table:
            raise ConfigError(f"{self.out} is an ablation of {known['table']}: give another out= or name=")
        planned = {}
        for recipe in self.recipes:
            if recipe.name in known.get("recipes", {}):
                planned[recipe.name] = PlannedRecipe(**known["recipes"][recipe.name])
                continue
            r = compute_filter(self.settings.table, recipe, self.storage)
            planned[recipe.name] = PlannedRecipe(
                recipe.name, r.filter, r.table_version, r.kept, r.total, r.thresholds
            )
        everything = {"table": self.settings.table, "recipes": known.get("recipes", {})}
        everything["recipes"] |= {n: asdict(p) for n, p in planned.items()}
        write_whole(fs, path, json.dumps(everything, indent=2).encode())
        return [planned[r.name] for r in self.recipes]

    def run_dir(self, recipe: str) -> str:
        return join(self.out, "runs", recipe)

    def config(self, recipe: PlannedRecipe) -> RunConfig:
        """One recipe's training: the shared settings, the recipe's filter on the pinned table version."""
        cfg = compose(
            [
                *self.train_args,
                f"data.table={self.settings.table}",
                f"train.steps={self.settings.steps}",
                f"checkpoint.run_dir={self.run_dir(recipe.name)}",
                f"job_name={self.settings.name}-{recipe.name}",
            ]
        )
        cfg.data.filter = recipe.filter  # set here, not as an override: a filter is SQL, not a dotlist value
        cfg.data.version = str(recipe.table_version)
        validate(cfg)
        return cfg

    def summary(self, planned: list[PlannedRecipe], metrics: dict[str, dict[str, Any]]) -> dict[str, Any]:
        return {
            "table": self.settings.table,
            "steps": self.settings.steps,
            "protocol": self.settings.eval,
            "recipes": [
                asdict(p) | {"run": self.run_dir(p.name), "metrics": metrics[p.name]["values"]}
                for p in planned
            ],
        }

    def run(self) -> dict[str, Any]:
        """Train, evaluate, compare and build the arena; what is done already is reused."""
        planned = self.plan()
        configs = {p.name: self.config(p) for p in planned}  # all checked before any training starts
        unfinished = []
        for p in planned:
            print(
                f"recipe {p.name}: {p.kept} of {p.total} clips, table version {p.table_version}", flush=True
            )
            if not self.train(configs[p.name]):
                unfinished.append(p.name)
        if unfinished:  # every recipe was launched first: submitted jobs train side by side
            raise AblationError(
                f"training of {', '.join(unfinished)} not finished (see above); the same command resumes it "
                "(after submitted jobs have ended)"
            )
        metrics, folders = {}, {}
        for p in planned:
            metrics[p.name], folders[p.name] = self.evaluate(p.name)
        self.write_comparison(planned, metrics)
        from svd.arena.catalog import create

        create(join(self.out, "arena"), folders, self.storage)
        return self.summary(planned, metrics)

    def train(self, cfg: RunConfig) -> bool:
        """Launch the recipe's training unless its last step is saved (a stopped run resumes); whether it
        has its last step now (not yet for a job submitted without waiting, or a failed one)."""
        from svd.launch import launcher_module

        run = cfg.checkpoint.run_dir
        if self._trained(run):
            print(f"{run}: trained already ({self.settings.steps} steps), reused", flush=True)
            return True
        status = launcher_module(cfg.launcher.name).launch(cfg)
        if self._trained(run):
            return True
        print(f"{run}: not trained to step {self.settings.steps} (launcher status {status})", flush=True)
        return False

    def _trained(self, run: str) -> bool:
        from svd.train.trained import committed_steps

        steps = committed_steps(run, self.storage)
        return bool(steps) and steps[-1] >= self.settings.steps

    def evaluate(self, recipe: str) -> tuple[dict[str, Any], str]:
        """(metrics, samples folder) of the recipe's last step under the protocol; reused when written."""
        from svd.eval.job import EvaluateSettings, Evaluation
        from svd.train.distributed import device_and_backend

        step = self.settings.steps
        run = self.run_dir(recipe)
        settings = EvaluateSettings(
            run=run,
            checkpoint=str(step),
            held_out="table",  # every recipe on the same conditions, whatever its filter kept
            out=join(run, "eval", f"{self.protocol.name}-table-held-out"),
        )
        evaluation = Evaluation(settings, self.protocol, self.storage, device=device_and_backend(0)[0])
        folder = evaluation.folder(step)
        fs, path = self.storage.fsspec(join(folder, "metrics.json"))
        if fs.exists(path):
            print(f"{folder}: evaluated already, reused", flush=True)
            return json.loads(fs.cat_file(path)), folder
        metrics = evaluation.evaluate(step, progress=False)
        if metrics is None:  # a stop request ended it between shards
            raise AblationError(f"{folder}: evaluation not finished; the same command resumes it")
        return metrics, folder

    def write_comparison(self, planned: list[PlannedRecipe], metrics: dict[str, dict[str, Any]]) -> None:
        from svd.eval.compare import plot, table

        by_recipe = {p.name: [metrics[p.name]] for p in planned}
        for name, data in (
            ("comparison.txt", (table(by_recipe) + "\n").encode()),
            ("comparison.png", plot(by_recipe, self.protocol.name)),
            ("comparison.json", json.dumps(self.summary(planned, metrics), indent=2).encode()),
        ):
            fs, path = self.storage.fsspec(join(self.out, name))
            write_whole(fs, path, data)
