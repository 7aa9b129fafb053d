"""The curation job's settings, checked before any video is touched."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from svd.curate.cuts import DETECTORS as CUT_DETECTORS

LAUNCHERS = ("local", "slurm", "ray")  # where shards run: this process, or svd/curate/shards.py


@dataclass
class CurateConfig:
    input: str = ""  # folder (any URI) of raw videos and images, walked recursively
    output: str = ""  # the clip table (Lance) to create or append to
    shard: str = "0/1"  # i/n: this process curates the i-th of n deterministic parts of the input
    workers: int = 2  # processes running the stages; 0 runs them in this process
    # where shards run: local (this process curates `shard`) | slurm (a job array of `shards` tasks) | ray
    # (`shards` Ray tasks on the cluster at $RAY_ADDRESS, else a local Ray); each task curates shard=i/shards
    launcher: str = "local"
    shards: int = 1
    cluster: str = (
        "default"  # slurm: site defaults (partition, account, time …) of jobs/conf/cluster/<name>.yaml
    )
    cpus_per_shard: int = 0  # slurm/ray; 0: workers + 1
    gpus_per_shard: int = 0  # slurm/ray: CLIP, captioning and latents run on a GPU where there is one
    folder: str = "outputs/launch/curate"  # slurm: submitit's logs and pickles (a shared filesystem)
    wait: bool = True  # slurm: stay until every shard ends and report each (else print the job id)
    commit_every: int = 8  # videos per Lance commit (a crash loses at most this many)
    source: str = ""  # the `source` column; default: the input URI
    split: str = "train"
    # cut detection and clips
    cut_detector: str = "cascade"  # cascade (relative thresholds, CPU) | transnetv2 (the transnet extra)
    min_clip_s: float = 2.0
    max_clip_s: float | None = None  # split longer clips into equal parts
    max_video_s: float = 3600.0  # longer videos are rejected ("too_long")
    # appearance (first, middle and last frame of each clip, `analysis_side` px on the short side)
    analysis_side: int = 224
    clip_model: str | None = None  # CLIP folder/URI (Hugging Face layout); None: no aesthetic/CLIP scores
    aesthetic_head: str | None = None  # .safetensors/.pth of a LAION-style head on the CLIP embedding
    text_detector: str | None = None  # TorchScript CRAFT-class model; None: the built-in detector
    captioner: str | None = None  # image-to-text model folder/URI; sidecar .txt/.json are always read
    # optional latents for training without the encoder
    latents: bool = False
    autoencoder: str = "kl_temporal"  # svd.model.autoencoder kinds
    autoencoder_path: str | None = None  # None: tiny random weights (tests only)
    latent_size: list[int] = field(default_factory=lambda: [320, 576])  # frames are cropped to H, W
    latent_frames: int = 14
    latent_fps: float = 8.0
    cache_dir: str = str(Path.home() / ".cache" / "svd" / "models")  # local copies of remote weights
    tag: str | None = None  # tag for the version this run produces; default curate-<time>-<shard>
    # other modes of the same command
    report: str | None = None  # write a report of the table `output` to this folder instead of curating
    recipe: str | None = None  # dataset card (YAML) whose filter to compute on `output`

    def validate(self) -> None:
        """Raises ValueError naming the first bad setting. A setting that would fail every video must fail
        here, once: a failure inside the stages is retried on every rerun, never fixed by one."""
        if not self.output:
            raise ValueError(
                "output= is required: the URI of the clip table (e.g. s3://bucket/lvd/clips.lance)"
            )
        if not (self.input or self.report or self.recipe):
            raise ValueError("input= is required: the folder of raw videos (e.g. s3://bucket/raw/)")
        self.shard_index()  # raises on a malformed shard
        self._validate_launcher()
        self._validate_ranges()
        if self.max_clip_s is not None and not self.max_clip_s >= self.min_clip_s:
            raise ValueError(f"max_clip_s={self.max_clip_s} must be ≥ min_clip_s={self.min_clip_s} (or null)")
        if not self.max_video_s >= self.min_clip_s:
            raise ValueError(f"max_video_s={self.max_video_s} must be ≥ min_clip_s={self.min_clip_s}")
        if self.cut_detector not in CUT_DETECTORS:
            raise ValueError(
                f"cut_detector={self.cut_detector!r}: expected one of {', '.join(CUT_DETECTORS)}"
            )
        if self.aesthetic_head and not self.clip_model:
            raise ValueError("aesthetic_head= needs clip_model=: the head scores CLIP embeddings")
        self._validate_latents()

    def _validate_ranges(self) -> None:
        """Every number's range and every name that must not be empty, whether or not this run uses it (a
        value that cannot be right is a mistake either way)."""
        for key in ("workers", "cpus_per_shard", "gpus_per_shard"):
            _require(getattr(self, key) >= 0, f"{key}={getattr(self, key)} must be ≥ 0")
        for key in ("shards", "commit_every", "latent_frames"):
            _require(getattr(self, key) >= 1, f"{key}={getattr(self, key)} must be ≥ 1")
        for key in ("min_clip_s", "latent_fps"):
            _require(getattr(self, key) > 0, f"{key}={getattr(self, key)} must be > 0")
        _require(self.analysis_side >= 16, f"analysis_side={self.analysis_side} must be ≥ 16 pixels")
        for key in ("cluster", "folder", "split", "cache_dir"):
            _require(getattr(self, key) != "", f"{key} is empty")
        _require(self.autoencoder_path != "", "autoencoder_path is empty: give a folder or URI, or null")

    def _validate_launcher(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"launcher={self.launcher!r}: expected one of {', '.join(LAUNCHERS)}")
        if self.launcher == "local" and self.shards > 1:
            raise ValueError(
                f"shards={self.shards} needs launcher=slurm or launcher=ray; on one host run "
                f"shard=i/{self.shards} in each of several processes"
            )
        if self.launcher != "local" and self.shard != "0/1":
            raise ValueError(f"shard={self.shard} with launcher={self.launcher}: set shards=N instead")

    def _validate_latents(self) -> None:
        from svd.model.autoencoder import KINDS

        if self.autoencoder not in KINDS:
            raise ValueError(f"autoencoder={self.autoencoder!r}; choose one of {KINDS}")
        if len(self.latent_size) != 2 or min(self.latent_size) < 8:
            raise ValueError(f"latent_size={list(self.latent_size)} must be [height, width], each ≥ 8")

    def shard_index(self) -> tuple[int, int]:
        try:
            i, n = (int(x) for x in self.shard.split("/"))
        except ValueError:
            raise ValueError(f"shard={self.shard!r}: expected i/n, e.g. 0/4") from None
        if not 0 <= i < n:
            raise ValueError(f"shard={self.shard!r}: need 0 ≤ i < n")
        return i, n


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)
