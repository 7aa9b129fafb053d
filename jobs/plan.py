"""Capacity plan of a training run: memory per GPU, FLOPs, step time, days and data rate, before submitting.

    python jobs/plan.py stage=video_pretrain nodes=32                  # 32 nodes × 8 H100 (gpu=h100-80gb)
    python jobs/plan.py stage=video_finetune_hq nodes=4 gpu=a100-80gb parallel.activation_checkpointing=full
    python jobs/plan.py stage=video_pretrain nodes=32 --json           # the same plan, machine-readable
    python jobs/plan.py stage=video_pretrain nodes=32 --blocks         # + per-block params, FLOPs, memory
    python jobs/plan.py --scaling-doc docs/scaling.md                   # regenerate docs/scaling.md

Arguments are those of jobs/launch.py (`group=option`, `key=value`); `gpu=` picks a GPU of
jobs/conf/gpu/, and gpus_per_node defaults to that GPU's node size. data.table is not read. Assumptions
(utilisation, allowances) are the `plan.*` settings. Exit status 1 when the plan does not fit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from svd.config import ConfigError, RunConfig, compose, options
from svd.launch.plan import PlanError, compute_bytes, cost_of, plan, resolved_sharding
from svd.launch.plan_report import format_blocks, format_plan, scaling_doc

FLAGS = ("--help", "-h", "--json", "--blocks", "--scaling-doc")


NODE_SIZE = "gpus_per_node=${gpu.node_gpus}"  # the GPU kind's node size, resolved while composing


def compose_for_plan(args: list[str]) -> RunConfig:
    """The run configuration, with a GPU node's worth of processes unless gpus_per_node is given: composed
    once, so a mistake is reported with the gpus_per_node the plan uses."""
    given = any(a.startswith("gpus_per_node=") for a in args)
    return compose(["data.table=unread", *args, *([] if given else [NODE_SIZE])])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(__doc__.strip())
        print(f"\ngpus: {' | '.join(options('gpu'))}")
        return 0
    if "--scaling-doc" in argv:
        at = argv.index("--scaling-doc")
        if at + 1 >= len(argv):
            print("plan: --scaling-doc needs a path (e.g. docs/scaling.md)", file=sys.stderr)
            return 2
        path = Path(argv[at + 1])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(scaling_doc())
        print(f"wrote {path}")
        return 0
    unknown = [a for a in argv if a.startswith("-") and a not in FLAGS]
    if unknown:
        print(f"plan: unknown flag {unknown[0]}; flags are {list(FLAGS)}", file=sys.stderr)
        return 2
    args = [a for a in argv if not a.startswith("-")]
    try:
        cfg = compose_for_plan(args)
        p = plan(cfg)
    except (ConfigError, PlanError) as e:
        defaulted = not any(a.startswith("gpus_per_node=") for a in args) and "gpus_per_node" in str(e)
        note = " (gpus_per_node is the GPU's node size, gpu.node_gpus, unless given)" if defaulted else ""
        print(f"plan: {e}{note}", file=sys.stderr)
        return 2
    print(json.dumps(p.to_dict(), indent=2) if "--json" in argv else format_plan(p))
    if "--blocks" in argv:
        print("\n" + format_blocks(cost_of(cfg), compute_bytes(cfg, resolved_sharding(cfg)[0])))
    return 0 if p.fits else 1


if __name__ == "__main__":
    sys.exit(main())
