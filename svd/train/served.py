"""A test-only hook: every sample a rank trains on, as JSON lines, so tests can compare provenance (which is
recomputed, never logged: DESIGN decision 11) with what was really served.

Set `SVD_SERVED_LOG=<local folder>`; each rank process appends `{"step", "rank", "micro", "position",
"row", "clip_id"}` lines to `<folder>/rank<r>-<pid>.jsonl`. Unset (production), the trainer gets None and
does nothing per batch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

ENV = "SVD_SERVED_LOG"


def log_from_env(rank: int) -> Callable[[int, int, dict[str, Any]], None] | None:
    folder = os.environ.get(ENV)
    if not folder:
        return None
    path = Path(folder) / f"rank{rank}-{os.getpid()}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)

    def record(step: int, micro: int, batch: dict[str, Any]) -> None:
        rows = zip(batch["position"].tolist(), batch["row"].tolist(), batch["clip_id"], strict=True)
        with path.open("a") as out:
            for position, row, clip_id in rows:
                line = {"step": step, "rank": rank, "micro": micro, "position": position, "row": row}
                out.write(json.dumps(line | {"clip_id": clip_id}) + "\n")

    return record
