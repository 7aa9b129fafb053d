"""Curate raw videos into a scored clip table, report on a table, or compute a recipe's filter.

    python jobs/curate.py input=s3://bucket/raw/ output=s3://bucket/lvd/clips.lance
    python jobs/curate.py input=… output=… shard=3/16 workers=8 clip_model=s3://models/clip-vit-l-14
    python jobs/curate.py input=… output=… launcher=slurm shards=64 cluster=<site>   # a Slurm job array
    python jobs/curate.py input=… output=… launcher=ray shards=64                    # Ray tasks
    python jobs/curate.py output=s3://bucket/lvd/clips.lance recipe=datasets/lvd_f.yaml
    python jobs/curate.py output=s3://bucket/lvd/clips.lance report=outputs/report recipe=datasets/lvd_f.yaml

Settings are key=value (OmegaConf dotlist); object-storage credentials come from the AWS_* variables, and
storage deadlines from SVD_STORAGE_CONNECT_TIMEOUT, SVD_STORAGE_READ_TIMEOUT, SVD_STORAGE_MAX_ATTEMPTS.

Exit status: 0 done; 1 a problem with the input, the output, storage or a model (one line on stderr), or
videos that failed for a transient reason (rerun the same command to retry them); 2 bad settings.
SIGTERM stops the run like Ctrl-C: the uncommitted batch is redone by the next run.
"""

from __future__ import annotations

import gc
import inspect
import os
import re
import signal
import sys
from typing import TYPE_CHECKING

import yaml

from svd.config import parse_settings
from svd.curate import config as config_module
from svd.curate.config import CurateConfig
from svd.data.storage import Storage

if TYPE_CHECKING:
    from svd.curate.recipes import Recipe


def usage() -> str:
    """The module docstring, then every setting with its default and the comment beside it in config.py."""
    lines, defaults = [__doc__.strip(), "", "settings:"], CurateConfig()
    for line in inspect.getsource(config_module.CurateConfig).splitlines():
        match = re.match(r"\s+(\w+): [^=]+=.*?(?:#\s*(.*))?$", line)
        if match and hasattr(defaults, match.group(1)):
            name, comment = match.groups()
            lines.append(f"  {name}={getattr(defaults, name)!r}" + (f"  — {comment}" if comment else ""))
    return "\n".join(lines)


def parse(argv: list[str]) -> CurateConfig:
    cfg = parse_settings(CurateConfig, argv)
    cfg.validate()
    return cfg


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help", "help") for a in argv):
        print(usage())
        return 0
    try:
        cfg = parse(argv)
        storage = Storage.from_env()  # its settings (SVD_STORAGE_*) are settings too
        recipe = read_recipe(cfg.recipe) if cfg.recipe else None
    except ValueError as e:
        print(f"curate: {e}", file=sys.stderr)
        return 2

    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _run(cfg, storage, recipe)
    except KeyboardInterrupt:
        print("curate: interrupted; rerun the same command to continue", file=sys.stderr)
        return 130
    except Exception as e:  # input, output, storage, models: known before curating, one line each
        from svd.curate.ledger import OutputError
        from svd.curate.pipeline import InputError, StageError

        if not isinstance(e, InputError | OutputError | StageError | OSError):
            raise
        print(f"curate: {e}", file=sys.stderr)
        return 1


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def read_recipe(card: str) -> Recipe:
    """The dataset card's recipe; a card that is missing or not a recipe is a bad setting."""
    from svd.curate.recipes import load_recipe

    try:
        return load_recipe(card)
    except OSError as e:
        raise ValueError(f"recipe={card}: cannot be read ({e.strerror})") from None
    except (ValueError, TypeError, yaml.YAMLError) as e:  # not YAML, no recipe section, unknown rule keys
        raise ValueError(
            f"recipe={card}: not a dataset card with a recipe ({' '.join(str(e).split())})"
        ) from None


def _run(cfg: CurateConfig, storage: Storage, recipe: Recipe | None) -> int:
    from svd.curate.ledger import OutputError
    from svd.curate.recipes import compute_filter, save
    from svd.data.table import open_dataset

    if (cfg.report or (recipe and not cfg.input)) and open_dataset(cfg.output, storage) is None:
        raise OutputError(f"output={cfg.output}: no table there to report on or to filter")
    if cfg.report:
        from svd.curate.report import write_report

        print(f"wrote {write_report(cfg.output, cfg.report, storage, recipe)}")
        return 0
    if recipe and not cfg.input:
        result = compute_filter(cfg.output, recipe, storage)
        print(
            f"recipe {result.recipe} on {result.table} (version {result.table_version}): "
            f"kept {result.kept} of {result.total} clips"
        )
        print(f"filter: {result.filter}")
        print(f"wrote {save(result, storage)}")
        return 0

    if cfg.launcher != "local":
        from svd.curate.shards import run_shards

        return run_shards(cfg)

    from svd.curate.pipeline import run

    summary = run(cfg)
    print(
        f"shard {cfg.shard}: {summary.videos_in_shard} inputs, {summary.skipped_existing} already in the "
        f"table, {summary.curated} curated → {summary.clips} clips"
    )
    for status, count in summary.status.most_common():
        print(f"  {status}: {count}")
    if summary.tag:
        print(f"table {cfg.output} at version {summary.version}, tagged {summary.tag}")
    if summary.transient:
        for line in summary.errors[:5]:
            print(f"curate: error: {line}", file=sys.stderr)
        print(
            f"curate: {summary.transient} videos failed for a reason a rerun may not meet again (storage, "
            "models, sidecar files); rerun the same command to retry them",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    status = main()
    if status == 130:  # stopped: skip the ~1 s teardown of torch and Lance; the tables are already safe
        gc.collect()  # but release the stopped pool's semaphores, or the resource tracker warns of leaks
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
