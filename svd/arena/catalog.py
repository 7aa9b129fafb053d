"""What an arena compares: its models (each a folder of the evaluation job's samples), the conditions every
model sampled (same condition, same seed), the pairs to vote on, and an opaque id for every video.

    <arena_dir>/arena.json    {"models": {"lvd_f": "<…>/eval/motion_adherence/step-00000100", …}, "salt": …}

Each model folder holds `samples.lance` as `svd/eval/job.py` writes it (condition, motion_bucket_id, seed,
caption, video: a path relative to the folder). The ids the browser sees are keyed hashes (the arena's
secret salt): they name neither a model nor a path, and a request can only pick among them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import secrets
from dataclasses import dataclass

from svd.config import ConfigError
from svd.data.storage import Storage, join, write_whole

ARENA_FILE = "arena.json"
SAMPLES_TABLE = "samples.lance"
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=:,-]{0,99}")

Condition = tuple[int, int, int]  # (condition number, motion bucket, seed): one sample's inputs


@dataclass(frozen=True)
class Video:
    model: int
    condition: Condition
    uri: str  # never leaves the server


@dataclass(frozen=True)
class Pair:
    """Two models' samples of one condition; `a` < `b` (model indices)."""

    id: str
    condition: Condition
    a: int
    b: int
    caption: str


class Catalog:
    def __init__(self, models: list[str], folders: list[str], salt: str, storage: Storage):
        self.models, self.folders, self.salt = models, folders, salt
        samples = [_samples(folder, storage) for folder in folders]
        shared = sorted(set.intersection(*(set(s) for s in samples)))
        if not shared:
            raise ConfigError(
                "the models' samples share no condition (same condition, motion bucket and seed): "
                "evaluate them with the same protocol"
            )
        _check_same_inputs(models, samples, shared)
        self.conditions: list[Condition] = shared
        self.videos: dict[str, Video] = {}
        self._video_of: dict[tuple[int, Condition], str] = {}
        for m, table in enumerate(samples):
            for c in shared:
                vid = self._id(f"video|{models[m]}|{c}")
                self.videos[vid] = Video(m, c, join(folders[m], table[c]["video"]))
                self._video_of[(m, c)] = vid
        self.pairs: dict[str, Pair] = {}
        for c in shared:
            caption = samples[0][c].get("caption") or ""
            for a, b in itertools.combinations(range(len(models)), 2):
                pid = self._id(f"pair|{models[a]}|{models[b]}|{c}")
                self.pairs[pid] = Pair(pid, c, a, b, caption)

    @staticmethod
    def load(arena_dir: str, storage: Storage) -> Catalog:
        fs, path = storage.fsspec(join(arena_dir, ARENA_FILE))
        try:
            spec = json.loads(fs.cat_file(path))
        except FileNotFoundError:
            raise ConfigError(f"{arena_dir}: not an arena (no {ARENA_FILE}; create one with `new`)") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{join(arena_dir, ARENA_FILE)}: not JSON ({e})") from None
        models = spec.get("models") if isinstance(spec, dict) else None
        if not isinstance(models, dict) or len(models) < 2 or not spec.get("salt"):
            raise ConfigError(
                f"{join(arena_dir, ARENA_FILE)}: needs 'models' (at least 2 sample folders) and 'salt'"
            )
        return Catalog(list(models), list(models.values()), str(spec["salt"]), storage)

    def video_of(self, model: int, condition: Condition) -> str:
        return self._video_of[(model, condition)]

    def _id(self, key: str) -> str:
        """A keyed hash: without the salt, knowing the model names does not tell which id is whose."""
        return hashlib.sha256(f"{self.salt}|{key}".encode()).hexdigest()[:20]


def create(arena_dir: str, models: dict[str, str], storage: Storage, *, salt: str | None = None) -> str:
    """Write `<arena_dir>/arena.json` for these models ({name: samples folder}) with a secret salt (a new
    random one unless given: tests fix it); refuses to replace an arena that exists (its votes name pairs by
    ids made from its salt)."""
    if len(models) < 2:
        raise ConfigError(f"an arena needs at least 2 models, got {len(models)}")
    for name in models:
        if not MODEL_NAME.fullmatch(name):
            raise ConfigError(f"model name {name!r}: letters, digits and _.=:,- only")
    fs, path = storage.fsspec(join(arena_dir, ARENA_FILE))
    if fs.exists(path):
        spec = json.loads(fs.cat_file(path))
        if spec.get("models") == models:
            return join(arena_dir, ARENA_FILE)  # the same arena again (a rerun of the ablation)
        raise ConfigError(
            f"{arena_dir} is an arena of other models ({sorted(spec['models'])}): choose another"
        )
    Catalog(list(models), list(models.values()), "check", storage)  # every folder readable, conditions shared
    write_whole(
        fs, path, json.dumps({"models": models, "salt": salt or secrets.token_hex(16)}, indent=2).encode()
    )
    return join(arena_dir, ARENA_FILE)


def _check_same_inputs(
    models: list[str], samples: list[dict[Condition, dict]], shared: list[Condition]
) -> None:
    """A condition number names the same input in every model's samples only if they come from the same
    clips: runs evaluated on their own held-out clips (each run's filter applied) are refused."""
    for c in shared:
        clips = [s[c].get("clip_id") for s in samples]
        if len(set(clips)) > 1:
            raise ConfigError(
                f"condition {c[0]} is clip {clips[0]!r} in {models[0]}'s samples but {clips[1:]!r} in the "
                "others': evaluate the models on the same held-out clips (jobs/evaluate.py held_out=table)"
            )


def _samples(folder: str, storage: Storage) -> dict[Condition, dict]:
    import lance

    uri = join(folder, SAMPLES_TABLE)
    try:
        table = lance.dataset(uri, storage_options=storage.lance_options(uri)).to_table()
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"{uri}: cannot be read as a samples table ({' '.join(str(e).split())[:200]})"
        ) from e
    missing = {"condition", "motion_bucket_id", "seed", "video"} - set(table.column_names)
    if missing:
        raise ConfigError(f"{uri}: not a samples table of the evaluation job (no {sorted(missing)})")
    rows = table.to_pylist()
    for r in rows:  # the table's paths are joined to the folder: none may leave it
        if r["video"].startswith("/") or ".." in r["video"].split("/") or "://" in r["video"]:
            raise ConfigError(f"{uri}: video {r['video']!r} is not a path inside its folder")
    return {(r["condition"], r["motion_bucket_id"], r["seed"]): r for r in rows}
