"""Recipes: filters that turn a scored clip table into a training set, as Lance filter expressions.

A recipe is written as percentile rules (SVD's LVD-F drops the 25 % most static clips, the 25 % lowest
aesthetic, the 50 % lowest CLIP score, the 25 % most text) plus optional fixed predicates. Percentiles
are computed on the table — the same recipe adapts to any corpus — and the result is a plain filter
expression, pinned to the table version it was computed on, that the loader pushes down to Lance.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import lance
import numpy as np
import yaml

from svd.data.storage import Storage

SCORE_COLUMNS = ("motion_score", "aesthetic_score", "clip_score", "text_area")


@dataclass(frozen=True)
class PercentileRule:
    column: str
    drop: str  # "lowest" or "highest"
    fraction: float  # share of the scored clips dropped by this rule alone

    def __post_init__(self) -> None:
        if self.column not in SCORE_COLUMNS:
            raise ValueError(f"recipe rule column {self.column!r}: choose one of {SCORE_COLUMNS}")
        if self.drop not in ("lowest", "highest"):
            raise ValueError(f"recipe rule drop={self.drop!r}: choose lowest or highest")
        if not 0 <= self.fraction < 1:
            raise ValueError(f"recipe rule fraction={self.fraction} must be in [0, 1)")


@dataclass(frozen=True)
class Recipe:
    name: str
    rules: tuple[PercentileRule, ...]
    fixed: tuple[str, ...] = ()  # extra Lance predicates, e.g. "text_area < 0.07"


@dataclass(frozen=True)
class RecipeResult:
    recipe: str
    table: str
    table_version: int
    filter: str
    thresholds: dict[str, float]
    total: int
    kept: int


def load_recipe(card: str | Path) -> Recipe:
    """The `recipe:` section of a dataset card (YAML) in `datasets/`."""
    data = yaml.safe_load(Path(card).read_text())
    if not isinstance(data, dict) or "recipe" not in data:
        raise ValueError(f"{card}: no 'recipe:' section")
    section = data["recipe"]
    rules = tuple(PercentileRule(**rule) for rule in section.get("drop", []))
    return Recipe(data.get("name", Path(card).stem), rules, tuple(section.get("where", [])))


def compute_filter(
    table_uri: str, recipe: Recipe, storage: Storage, version: int | str | None = None
) -> RecipeResult:
    table = lance.dataset(table_uri, version=version, storage_options=storage.lance_options(table_uri))
    columns = sorted({rule.column for rule in recipe.rules})
    scores = table.to_table(columns=columns) if columns else None
    thresholds, predicates = {}, []
    for rule in recipe.rules:
        values = scores.column(rule.column).to_numpy(zero_copy_only=False).astype(np.float64)
        values = values[~np.isnan(values)]
        if not len(values):
            raise ValueError(f"recipe {recipe.name}: column {rule.column} has no scores in {table_uri}")
        if rule.drop == "lowest":
            threshold = float(np.quantile(values, rule.fraction))
            predicates.append(f"{rule.column} >= {threshold!r}")
        else:
            threshold = float(np.quantile(values, 1 - rule.fraction))
            predicates.append(f"{rule.column} <= {threshold!r}")
        thresholds[f"{rule.column} ({rule.drop} {rule.fraction:.0%} dropped)"] = threshold
    expression = " AND ".join(predicates + [f"({p})" for p in recipe.fixed]) or "true"
    return RecipeResult(
        recipe.name,
        table_uri,
        table.version,
        expression,
        thresholds,
        table.count_rows(),
        table.count_rows(filter=expression),
    )


def save(result: RecipeResult, storage: Storage) -> str:
    """Writes the result as JSON beside the table: `<table>.recipes/<name>-v<version>.json`."""
    base = result.table.rstrip("/").removesuffix(".lance")
    uri = f"{base}.recipes/{result.recipe}-v{result.table_version}.json"
    fs, path = storage.fsspec(uri)
    fs.makedirs(fs._parent(path), exist_ok=True)
    fs.pipe_file(path, json.dumps(asdict(result), indent=2).encode())
    return uri
