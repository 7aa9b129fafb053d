"""Train a stage of the paper, on this host, on Slurm or on Ray, through one code path.

    python jobs/launch.py stage=video_pretrain data.table=s3://bucket/lvd/clips.lance nodes=32 gpus_per_node=8
    python jobs/launch.py stage=i2v_finetune model=tiny data.table=… gpus_per_node=2 launcher=local
    python jobs/launch.py stage=video_pretrain data.table=… --cfg        # print the resolved configuration
    python jobs/launch.py stage=video_pretrain data.table=… nodes=32 --profile   # a few steps, traced
    python jobs/launch.py --help                                          # groups, options and settings

A GPU job (launcher slurm or ray with cluster.gpus, or local where CUDA is available) is planned first
(svd/launch/plan.py, for the GPU of `gpu=`) and refused when its peak memory per GPU does not fit, with the
term that is too large and the settings that would fix it; `plan.check=false` skips the check.

`--profile` runs the configured job (same launcher, nodes and settings) for a few steps in a run directory of
its own, with a torch.profiler trace of steps 2-4 (or `profile.steps`), and prints the top operators and the
share of step time spent waiting for data: a check of a configuration before a long submission.

Arguments are `group=option` (a YAML file of jobs/conf/<group>/) and `key=value` overrides of any setting
(svd/config.py says what each means). Object-storage credentials come from the AWS_* variables.
"""

from __future__ import annotations

import sys

from svd.config import GROUPS, ConfigError, RunConfig, compose, options, to_yaml
from svd.train.stop import STOPPED_STATUS

FLAGS = ("--help", "-h", "--cfg", "--dry-run", "--profile")


def usage() -> str:
    lines = [__doc__.strip(), "", "groups (default first):"]
    from svd.config import DEFAULT_OPTIONS

    for group in GROUPS:
        choices = options(group)
        default = DEFAULT_OPTIONS[group]
        lines.append(f"  {group}: {default}" + "".join(f" | {c}" for c in choices if c != default))
    lines += ["", "settings (key=value), with their defaults before the groups apply:"]
    lines += ["  " + line for line in to_yaml(RunConfig(data=_placeholder_data())).splitlines()]
    lines += [
        "",
        "flags: --cfg (print the resolved configuration), --dry-run (show what would start), "
        "--profile (a few traced steps: top operators and data-wait share)",
    ]
    return "\n".join(lines)


def _placeholder_data():
    from svd.config import DataConfig

    return DataConfig(table="<required>")


def describe(cfg: RunConfig) -> str:
    """What `--dry-run` prints: where the ranks would start."""
    return (
        f"launcher={cfg.launcher.name}: {cfg.world_size} rank(s) = nodes {cfg.nodes} × {cfg.gpus_per_node}; "
        f"stage {cfg.stage.name} ({cfg.stage.task}), model {cfg.model.preset}, {cfg.steps} steps of "
        f"global batch {cfg.train.global_batch} (micro-batch {cfg.data.micro_batch} × accumulation "
        f"{cfg.grad_accumulation}); run directory {cfg.checkpoint.run_dir}"
    )


def runs_on_gpus(cfg: RunConfig) -> bool:
    """Slurm and Ray jobs run on GPUs unless the cluster says otherwise; local runs where CUDA is."""
    if cfg.launcher.name in ("slurm", "ray"):
        return cfg.cluster.gpus
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    try:
        return run_command(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:  # outside training (the launchers stop training themselves, saving it)
        print("launch: interrupted", file=sys.stderr)
        return STOPPED_STATUS


def run_command(argv: list[str]) -> int:
    if "--help" in argv or "-h" in argv:
        print(usage())
        return 0
    flags = {a for a in argv if a.startswith("--")}
    unknown = flags - set(FLAGS)
    if unknown:
        print(f"launch: unknown flag {sorted(unknown)[0]}; flags are {list(FLAGS)}", file=sys.stderr)
        return 2
    try:
        cfg = compose([a for a in argv if not a.startswith("--")], check_uris=not flags - {"--profile"})
        if "--profile" in flags:
            from svd.train.profiling import profile_check

            cfg = profile_check(cfg)
    except ConfigError as e:
        print(f"launch: {e}", file=sys.stderr)
        return 2
    if "--cfg" in flags:
        print(to_yaml(cfg), end="")
        return 0
    planned = None
    if cfg.plan.check and runs_on_gpus(cfg):
        from svd.launch.plan import PlanError, plan
        from svd.launch.plan_report import refusal

        try:
            planned = plan(cfg)
        except PlanError as e:
            print(f"launch: {e}", file=sys.stderr)
            return 2
        if not planned.fits:
            print(f"launch: {refusal(cfg, planned)}", file=sys.stderr)
            return 2
    from svd.launch import launcher_module

    launcher = launcher_module(cfg.launcher.name)
    print(describe(cfg), flush=True)
    if planned is not None:
        from svd.launch.plan_report import summary

        print(summary(planned), flush=True)
    try:
        if "--dry-run" in flags:
            print(launcher.dry_run(cfg))
            return 0
        return launcher.launch(cfg)
    except ConfigError as e:  # a launcher's own settings (cluster.*), checked where they are used
        print(f"launch: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
