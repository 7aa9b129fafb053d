"""A run's settings as the end-to-end tests start it: the production configuration, shrunk."""

from __future__ import annotations

from svd.data.local_s3 import free_port


def production_settings(table: str, run_dir: str, *extra: str) -> list[str]:
    """Loader workers, the metrics endpoint (a free port), validation every 4 steps and previews every 6,
    asynchronous checkpoints every 3 steps, a progress line every step: what a cluster runs, with a tiny model
    on 4-frame clips. `extra` settings come last, so they override these. Validation and previews cost
    about two training steps each here: every two and three steps, they took 40% of a 12-step run."""
    return [
        "model=tiny",
        f"data.table={table}",
        f"checkpoint.run_dir={run_dir}",
        "data.frames=4",
        "data.fps=4",
        "data.num_workers=2",
        f"metrics.port={free_port()}",
        "train.val_every=4",
        "train.preview_every=6",
        "checkpoint.every=3",
        "checkpoint.async_save=true",
        "train.log_every=1",
        "train.seed=0",
        *extra,
    ]
