"""Data provenance of a run: which clips trained a checkpoint, which steps and checkpoints trained on a clip,
and the proof that a takedown list was honoured. Answers are recomputed from the checkpoint's lineage (the
sample order is a pure function of seed, table version, filter, buckets and samples consumed), never read
from per-sample logs.

    python jobs/provenance.py run=s3://bucket/runs/video_pretrain checkpoint=120000 out=clips.lance
    python jobs/provenance.py run=s3://bucket/runs/video_pretrain checkpoint=120000 --csv > clips.csv
    python jobs/provenance.py run=s3://bucket/runs/i2v clip=video_0042_003
    python jobs/provenance.py run=s3://bucket/runs/i2v video=s3://bucket/raw/v42.mp4
    python jobs/provenance.py run=s3://bucket/runs/i2v exclude-check=s3://bucket/takedown-2026-12.txt

checkpoint=N: one row per clip: run, checkpoint (the stage's checkpoint that read it), clip_id, video_uri,
times_seen, first_step, last_step, through every stage the checkpoint descends from (`stage.init_from`).
Written to out= (`.lance` a Lance table, `.arrow` an Arrow IPC file, `.csv`), or as CSV on stdout (--csv).
clip=ID | video=URI: every read (run, step, rank, micro-batch, stream position, whether it stood in for an
undecodable or excluded clip), then the checkpoints that trained on it; up to checkpoint=N or the latest.
exclude-check=LIST: whether any step after the list came into force read one of its clips.

Exit status: 0 answered (or the check passed); 1 the check failed, or the run, its lineage or the table cannot
be used — a lineage that disagrees with its checkpoint (edited config, another table version) is reported,
not answered; 2 bad arguments.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from svd.config import parse_settings
from svd.errors import described

OUTPUTS = (".lance", ".arrow", ".csv")


@dataclass
class ProvenanceConfig:
    run: str = ""  # the run directory (any URI)
    checkpoint: int | None = None  # a committed step; None: the latest (clip=, video=, exclude_check=)
    clip: str | None = None
    video: str | None = None
    exclude_check: str | None = None  # URI of a takedown list (as data.exclude takes)
    out: str | None = None  # .lance, .arrow or .csv; none: CSV on stdout


def parse(argv: list[str]) -> ProvenanceConfig:
    """`--csv` (CSV on stdout) is what no out= means too; it is accepted to say so."""
    csv = "--csv" in argv
    argv = [a.replace("exclude-check=", "exclude_check=", 1) for a in argv if a != "--csv"]
    cfg = parse_settings(ProvenanceConfig, argv)
    questions = [k for k in ("clip", "video", "exclude_check") if getattr(cfg, k)]
    if not cfg.run:
        raise ValueError("run= is required (see --help)")
    if len(questions) > 1:
        raise ValueError(f"ask one question at a time: {', '.join(questions)}")
    if not questions and cfg.checkpoint is None:
        raise ValueError("give checkpoint=N, clip=ID, video=URI or exclude-check=LIST (see --help)")
    if cfg.out and not cfg.out.endswith(OUTPUTS):
        raise ValueError(f"out={cfg.out}: name a {', '.join(OUTPUTS)} file")
    if csv and cfg.out:
        raise ValueError("--csv writes to stdout: leave out out=")
    return cfg


def write(batches, schema, out: str | None) -> None:
    """Arrow batches to a Lance table, an Arrow IPC file or CSV (a file or stdout), one batch at a time."""
    import lance
    import pyarrow as pa
    import pyarrow.csv

    reader = pa.RecordBatchReader.from_batches(schema, batches)
    if out and out.endswith(".lance"):
        lance.write_dataset(reader, out, mode="create")
        return
    if out and out.endswith(".arrow"):
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with pa.OSFile(out, "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for batch in reader:
                writer.write_batch(batch)
        return
    sink = pa.OSFile(out, "wb") if out else pa.PythonFile(sys.stdout.buffer, mode="w")
    with pyarrow.csv.CSVWriter(sink, schema) as writer:
        for batch in reader:
            writer.write_batch(batch)
    if out:
        sink.close()
    else:
        sys.stdout.buffer.flush()  # stdout stays open: this may run inside a caller's process


def answer(cfg: ProvenanceConfig) -> int:
    from svd.data.exclusion import read_exclusion
    from svd.data.storage import Storage
    from svd.train import provenance

    storage = Storage.from_env()
    if cfg.exclude_check:
        check = provenance.exclude_check(
            cfg.run, cfg.checkpoint, read_exclusion(cfg.exclude_check, storage), storage
        )
        print(("exclude-check passed: " if check.passed else "exclude-check FAILED: ") + check.lines[0])
        print(*check.lines[1:], sep="\n")
        return 0 if check.passed else 1
    if cfg.clip or cfg.video:
        names = frozenset([cfg.clip or cfg.video])
        found = provenance.clip_reads(
            cfg.run,
            cfg.checkpoint,
            storage,
            clip_ids=names if cfg.clip else frozenset(),
            video_uris=names if cfg.video else frozenset(),
        )
        if not found.matched:
            print(f"provenance: no clip of the run's table is named {next(iter(names))}", file=sys.stderr)
            return 1
        write(found.reads.to_batches(), found.reads.schema, cfg.out)
        for run, steps in found.checkpoints.items():
            print(f"checkpoints of {run} that trained on it: {steps or 'none committed'}", file=sys.stderr)
        if not found.checkpoints:
            print("no checkpoint trained on it", file=sys.stderr)
        return 0
    chain = provenance.checkpoint_replay(cfg.run, cfg.checkpoint, storage).chain()  # all checked first
    for replay in chain:
        print(*replay.summary(), sep="\n", file=sys.stderr)
    write((batch for replay in chain for batch in replay.clips()), provenance.CLIP_SCHEMA, cfg.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return 0
    try:
        cfg = parse(argv)
    except ValueError as e:  # ConfigError is one
        print(f"provenance: {e}", file=sys.stderr)
        return 2
    from svd.train.provenance import ProvenanceError

    try:
        return answer(cfg)
    except ProvenanceError as e:
        print(f"provenance: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # storage, a missing table or list: one line naming it
        print(f"provenance: {described(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
