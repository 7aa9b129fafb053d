"""Which data? Train one model per curation recipe on the same budget, evaluate each, compare them and open
an arena of their samples: the paper's method for choosing its filters.

    python jobs/ablate.py table=s3://b/lvd/clips.lance recipes=[lvd_f,unfiltered] stage=video_pretrain \\
        model=small steps=20000 eval=motion_adherence launcher=slurm nodes=4
    python jobs/ablate.py table=… sweep=aesthetic_score:0.25,0.5,0.75 recipes=[unfiltered] model=small \\
        steps=20000 eval=i2v_holdout eval.samples=256 eval.feature_network=… eval.feature_sha256=…

recipes: dataset cards (a name in datasets/, or a path to a card with a `recipe:` section), or `unfiltered`.
sweep=<score>:<shares> adds one recipe per share: that share of the lowest-scored clips dropped. Every
recipe's run gets the same steps, global batch and train.seed (the global order's seed): only the filter
differs. Each is evaluated on every held-out clip of the table (held_out=table), the same for all.
Any other argument is a training setting (`group=option` or `key=value`, as for jobs/launch.py); `eval.<key>`
overrides a protocol setting (as for jobs/evaluate.py).

Results go to out= (default <table>.ablations/<name>): plan.json (each recipe's filter, pinned to the table
version), runs/<recipe>/ (training and evaluation), comparison.txt/.png/.json, and arena/ (serve it with
`python jobs/arena.py <out>/arena` after `add-rater`). Rerun the same command after a preemption or a
submitted job: finished trainings and evaluations are reused. Trainings run one after another through the
launcher; with launcher=slurm launcher.wait=false each is submitted and the command ends: rerun it once they
have. Evaluations run in this process (one device).

Exit status: 0 compared; 1 a training or evaluation did not finish, or the store cannot be used (one line on
stderr); 2 bad arguments.
"""

from __future__ import annotations

import sys

from svd.config import ConfigError
from svd.errors import described

OWN_KEYS = ("table", "recipes", "sweep", "steps", "eval", "out", "name")


def split(argv: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(the ablation's own settings, training settings, protocol overrides without `eval.`)."""
    own = [a for a in argv if a.split("=", 1)[0] in OWN_KEYS]
    protocol = [a.removeprefix("eval.") for a in argv if a.startswith("eval.")]
    train = [a for a in argv if a not in own and not a.startswith("eval.")]
    return own, train, protocol


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return 0
    from svd.ablation import AblateSettings, Ablation, AblationError
    from svd.config import parse_settings
    from svd.data.storage import Storage
    from svd.train.trained import RunError

    own, train, protocol = split(argv)
    try:
        ablation = Ablation(parse_settings(AblateSettings, own), train, protocol, Storage.from_env())
        summary = ablation.run()
    except ConfigError as e:
        print(f"ablate: {e}", file=sys.stderr)
        return 2
    except (AblationError, RunError, ValueError) as e:  # ValueError: a recipe the table cannot give
        print(f"ablate: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"ablate: {described(e)}", file=sys.stderr)
        return 1
    fs, path = ablation.storage.fsspec(f"{ablation.out}/comparison.txt")
    print(fs.cat_file(path).decode(), end="")
    print(f"{len(summary['recipes'])} recipes compared in {ablation.out} (arena: {ablation.out}/arena)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
