"""An evaluation protocol: what to sample, how many, and what to measure. One YAML per protocol in
`jobs/conf/eval/`, any field overridable (`eval.samples=256`):

- `i2v_holdout`: first frames of the run's held-out clips as conditions, their clips as references; FVD.
- `ucf101_zero_shot`: the paper's zero-shot FVD (class-name prompts, 16 frames, CFG 7, 2048 videos); the
  prompts file and a reference clip table of UCF-101 are the user's.
- `interpolation_holdout`: the first and last frames of held-out clips; PSNR, SSIM (and LPIPS
  where weights are given) of the frames between.
- `motion_adherence`: every condition sampled at several `motion_bucket_id` values; the optical-flow motion
  measured on the samples against the value asked for (Spearman ρ). Needs no downloaded weights.

Conditions are numbered in the protocol's fixed order; condition i is sampled with a seed derived from
(protocol seed, i), so a result depends neither on the world size nor on how the work was sharded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import OmegaConf

from svd.config import CONF_DIR, ConfigError, config_errors, suggest

METRICS = ("fvd", "motion_adherence", "interpolation")
CONDITION_SOURCES = ("holdout", "prompts")


@dataclass
class EvalProtocol:
    name: str = ""
    metric: str = "fvd"  # fvd | motion_adherence | interpolation
    tasks: list[str] = field(default_factory=list)  # the stage tasks it fits
    conditions: str = "holdout"  # holdout: the run's held-out clips; prompts: the lines of `prompts`
    prompts: str = ""  # URI of the prompts file (conditions=prompts)
    references: str = ""  # URI of a clip table of reference videos (conditions=prompts)
    samples: int = 2048  # conditions sampled (× the motion buckets for motion_adherence)
    frames: int = 16
    fps: float = 7.0  # the frame rate asked for (fps_id) and at which references are read
    height: int = 0  # 0: the run's data.height
    width: int = 0  # 0: the run's data.width
    guidance: list[float] = field(default_factory=lambda: [1.0, 3.0])  # min, max over frames
    sampler_steps: int = 25
    seed: int = 0
    motion_buckets: list[int] = field(default_factory=lambda: [127])  # each condition at each value
    shard_size: int = 8  # conditions per shard: what a preempted evaluation redoes at most per rank
    feature_network: str = ""  # FVD: URI of the I3D TorchScript file (see the README)
    feature_sha256: str = ""  # its checksum, pinned: another network is refused
    feature_size: int = 224
    counts: list[int] = field(default_factory=list)  # FVD against these sample counts too (≤ samples)
    bootstrap_draws: int = 200
    # a local folder of a CLIP model (Hugging Face layout): CLIP similarity of the frames to the prompt and to
    # the conditioning image (svd/eval/clip.py); empty: those metrics are skipped, in one line
    clip: str = ""
    # interpolation: a local folder with alexnet.pth and lin.pth (svd/eval/lpips.py): LPIPS of the generated
    # frames; empty: skipped, in one line. The backbone file's sha256 is pinned: another file is refused
    lpips: str = ""
    lpips_sha256: str = ""


def protocols() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "eval").glob("*.yaml"))


def load_protocol(name: str, overrides: list[str] = ()) -> EvalProtocol:
    """`jobs/conf/eval/<name>.yaml` with `key=value` overrides (keys without the `eval.` prefix)."""
    if name not in protocols():
        raise ConfigError(
            f"eval={name!r} is not a protocol; choose one of {protocols()}{suggest(name, protocols())}"
        )
    with config_errors(EvalProtocol):
        merged = OmegaConf.merge(
            OmegaConf.structured(EvalProtocol),
            OmegaConf.load(CONF_DIR / "eval" / f"{name}.yaml"),
            OmegaConf.from_dotlist(list(overrides)),
        )
        protocol: EvalProtocol = OmegaConf.to_object(merged)
    check_protocol(protocol)
    return protocol


def check_protocol(p: EvalProtocol) -> None:
    """Each setting's range, in one line naming the key (as `eval.<key>`)."""
    problems = []
    if p.metric not in METRICS:
        problems.append(f"eval.metric={p.metric!r}: choose one of {list(METRICS)}")
    if p.conditions not in CONDITION_SOURCES:
        problems.append(f"eval.conditions={p.conditions!r}: choose one of {list(CONDITION_SOURCES)}")
    for key in ("samples", "frames", "sampler_steps", "shard_size", "feature_size"):
        if getattr(p, key) < 1:
            problems.append(f"eval.{key}={getattr(p, key)} must be ≥ 1")
    for key in ("height", "width"):
        if getattr(p, key) < 0:
            problems.append(f"eval.{key}={getattr(p, key)} must be ≥ 0 (0: the run's)")
    if p.fps <= 0:
        problems.append(f"eval.fps={p.fps} must be > 0")
    if len(p.guidance) != 2 or min(p.guidance) < 0:
        problems.append(f"eval.guidance={p.guidance} must be [min, max] with both ≥ 0")
    if not p.motion_buckets or not all(0 <= b <= 255 for b in p.motion_buckets):
        problems.append(f"eval.motion_buckets={p.motion_buckets} must be values in 0…255")
    if p.metric == "motion_adherence" and len(set(p.motion_buckets)) < 2:
        problems.append("eval.motion_buckets: motion_adherence needs at least 2 different values")
    if p.metric == "interpolation" and p.frames < 3:
        problems.append(f"eval.frames={p.frames}: interpolation needs at least 3 (two given, one generated)")
    if p.conditions == "prompts" and not (p.prompts and p.references):
        problems.append("eval.prompts and eval.references are required with eval.conditions=prompts")
    if any(n < 2 for n in p.counts):
        problems.append(f"eval.counts={p.counts} must be ≥ 2 (counts above eval.samples are left out)")
    if p.bootstrap_draws < 10:
        problems.append(f"eval.bootstrap_draws={p.bootstrap_draws} must be ≥ 10")
    if p.lpips and not p.lpips_sha256:
        problems.append(f"eval.lpips={p.lpips} needs eval.lpips_sha256=<sha256 of its alexnet.pth>")
    if problems:
        raise ConfigError(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))


def check_fits(p: EvalProtocol, task: str, *, run: str) -> None:
    """A protocol that does not fit the run's stage is refused before anything is sampled."""
    if p.tasks and task not in p.tasks:
        raise ConfigError(f"eval={p.name} evaluates {' or '.join(p.tasks)} models; {run} trained {task}")
    if p.metric == "fvd" and not (p.feature_network and p.feature_sha256):
        raise ConfigError(
            f"eval={p.name}: FVD needs eval.feature_network=<URI of the I3D TorchScript file> and "
            "eval.feature_sha256=<its sha256> (see the README: Evaluation)"
        )
