"""Which clips trained a checkpoint, and which steps, ranks and checkpoints trained on a clip: recomputed from
a checkpoint's lineage (svd/train/lineage.py), never from per-sample logs (DESIGN decision 11).

    replay = checkpoint_replay(run, step, storage)  # its lineage, checked against its loader state
    for batch in replay.clips():                     # Arrow: clip_id, video_uri, times_seen, first/last step
        ...
    for bucket, clips in replay.find(clip_ids={"video_0001_000"}).items():
        reads = replay.reads_of(bucket, clips)       # every read; schedule.locate → (step, rank, micro)

How: each bucket's stream reads row perm_e(p mod N) at position p of epoch e = p // N (svd/data/order.py), and
the run consumed positions [0, C). So every clip is read once per whole epoch; where it falls in the first and
last epochs comes from the permutation's inverse, computed for blocks of clips at a time (bounded memory, no
pass over the C positions: 1.5·10⁹ samples cost three inverse evaluations per clip). Positions map to
(step, rank) through the lineage's segments, replayed with the loader's own sampler (`ClipSampler.schedule`).
Replaced positions (undecodable or excluded clips) are the only exceptions: the clips they touch are counted
read by read.

A lineage that disagrees with its checkpoint (loader state, recorded config, the table's content, the run's
config.yaml) raises ProvenanceError naming the disagreement: an answer from it would be wrong.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Iterator
from dataclasses import dataclass

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from svd.config import from_yaml
from svd.data.buckets import Bucket
from svd.data.exclusion import Exclusion
from svd.data.loader import ClipLoader, LoaderConfig, LoaderState, bucket_seed, open_table
from svd.data.order import EpochPermutation, stream_indices
from svd.data.storage import Storage, join
from svd.errors import described
from svd.train.checkpoint import CheckpointError, read_part
from svd.train.lineage import FORMAT
from svd.train.trained import committed_steps

CLIPS_PER_BLOCK = 1 << 18  # clips counted at once: ~50 MB of working arrays; the peak RSS grows with it
STEP_FOLDER = re.compile(r"^(?P<run>.+)/checkpoints/step-(?P<step>\d{8})/?$")
CLIP_SCHEMA = pa.schema(
    [
        ("run", pa.string()),
        ("checkpoint", pa.int64()),
        ("clip_id", pa.string()),
        ("video_uri", pa.string()),
        ("times_seen", pa.int64()),
        ("first_step", pa.int64()),
        ("last_step", pa.int64()),
    ]
)


class ProvenanceError(RuntimeError):
    """A checkpoint whose lineage is missing or disagrees with what it was saved with; names the problem."""


@dataclass(frozen=True)
class Reads:
    """Samples read: one entry per (clip, stream position) a step trained on, within one bucket."""

    bucket: int
    index: np.ndarray  # the clip's index within the bucket
    position: np.ndarray  # the stream position the sample stood for
    replaced: np.ndarray  # True: read in place of an undecodable or excluded clip at `position`


@dataclass(frozen=True)
class Schedule:
    """Every loader step (micro-batch) of the run up to the checkpoint, in order: its bucket, first stream
    position, per-rank batch size, training step and micro-batch index."""

    bucket: np.ndarray
    start: np.ndarray
    batch: np.ndarray
    width: np.ndarray  # batch × world size: the positions the step consumed
    step: np.ndarray
    micro: np.ndarray

    def locate(self, bucket: int, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(training step, rank, micro-batch) that read each stream position of `bucket`."""
        mine = np.flatnonzero(self.bucket == bucket)
        j = mine[np.searchsorted(self.start[mine], positions, side="right") - 1]
        offset = positions - self.start[j]
        if (offset < 0).any() or (offset >= self.width[j]).any():
            raise ProvenanceError(f"positions of bucket {bucket} outside every recorded step")
        return self.step[j], offset // self.batch[j], self.micro[j]


class Replay:
    """One checkpoint's lineage, checked and made answerable."""

    def __init__(self, folder: str, storage: Storage, *, cache_dir: str | None = None):
        match = STEP_FOLDER.match(folder)
        if match is None:
            raise ProvenanceError(f"{folder} is not a checkpoint folder (<run>/checkpoints/step-NNNNNNNN)")
        self.folder, self.run, self.step, self.storage = folder, match["run"], int(match["step"]), storage
        try:
            data = read_part(folder, "data", storage)
        except CheckpointError as e:
            raise ProvenanceError(str(e)) from e
        lineage = data.get("lineage")
        if not lineage:
            raise ProvenanceError(f"{folder} records no lineage (saved before lineages were recorded)")
        if lineage.get("format") != FORMAT:
            raise ProvenanceError(
                f"{folder}: lineage format {lineage.get('format')}, this svd reads {FORMAT}"
            )
        self.lineage, self.state = lineage, LoaderState.from_dict(data)
        self._check_state()
        self.loader = self._open_loader(cache_dir)
        self.schedule = self._replay_segments()
        self._check_configs()
        self.replaced = self._replaced()

    # ---- checks ------------------------------------------------------------------------------------------
    def _disagrees(self, what: str) -> ProvenanceError:
        return ProvenanceError(f"{self.folder}: lineage disagrees with the checkpoint: {what}")

    def _check_state(self) -> None:
        """The lineage's order inputs are the loader state's: the state is what training resumed from."""
        lineage, state = self.lineage, self.state
        recorded = (lineage["table_version"], lineage["table_content"], lineage["filter"], lineage["seed"])
        saved = (state.table_version, state.table_content, state.filter, state.seed)
        if recorded != saved or lineage["buckets"] != state.buckets:
            names = ("table version", "table content", "filter", "seed")
            different = [
                f"{n} {a!r} ≠ {b!r}" for n, a, b in zip(names, recorded, saved, strict=True) if a != b
            ]
            if lineage["buckets"] != state.buckets:
                different.append(f"buckets {lineage['buckets']} ≠ {state.buckets}")
            raise self._disagrees("lineage vs loader state: " + "; ".join(different))

    def _open_loader(self, cache_dir: str | None) -> ClipLoader:
        """The loader the run had (rank 0 of 1), at the pinned version: its row index and bucket sizes. It
        refuses a table whose rows changed under the same version (re-created at the same URI)."""
        lineage = self.lineage
        buckets = tuple(Bucket(int(h), int(w), int(f), 1, fps=fps) for h, w, f, fps in lineage["buckets"])
        cfg = LoaderConfig(
            table=lineage["table"],
            buckets=buckets,
            filter=lineage["filter"],
            version=lineage["table_version"],
            seed=lineage["seed"],
            num_workers=0,
            **({"cache_dir": cache_dir} if cache_dir else {}),
        )
        try:
            return ClipLoader(
                cfg,
                rank=0,
                world_size=1,
                storage=self.storage,
                state=self.state.to_dict(),
                shared_index=join(self.run, "row_index"),
            )
        except (ValueError, FileNotFoundError) as e:
            raise self._disagrees(described(e)) from e

    def _replay_segments(self) -> Schedule:
        """Every loader step from the lineage's segments, by the loader's sampler; the consumed counts each
        segment recorded at its start, and the loader state at the end, must be what the replay reaches."""
        segments = self.lineage["segments"]
        if not segments or segments[0]["step"] != 0 or any(segments[0]["consumed"]):
            begins = segments[0]["step"] if segments else self.step
            raise ProvenanceError(
                f"{self.folder}: its lineage begins after step {begins} (the run resumed from a checkpoint "
                "saved without one): the samples of the steps before it cannot be recomputed"
            )
        ends = [s["step"] for s in segments[1:]] + [self.step]
        consumed = tuple(segments[0]["consumed"])
        pieces = []
        for segment, end in zip(segments, ends, strict=True):
            if tuple(segment["consumed"]) != consumed:
                raise self._disagrees(
                    f"the segment from step {segment['step']} starts at {segment['consumed']} samples, the "
                    f"replay of the steps before it reaches {list(consumed)}"
                )
            if end < segment["step"]:
                raise self._disagrees(f"segments out of order at step {segment['step']}")
            accumulation = segment["accumulation"]
            state = dataclasses.replace(self.state, consumed=consumed)
            sampler = self.loader.sampler(segment["world_size"], tuple(segment["batch_sizes"]), state)
            count = (end - segment["step"]) * accumulation
            bucket, start = sampler.schedule(count)
            batch = np.asarray(segment["batch_sizes"], np.int64)[bucket]
            j = np.arange(count, dtype=np.int64)
            steps = segment["step"] + 1 + j // accumulation
            pieces.append((bucket, start, batch, batch * segment["world_size"], steps, j % accumulation))
            consumed = sampler.state.consumed
        if consumed != self.state.consumed:
            raise self._disagrees(
                f"the replay of its segments consumes {list(consumed)} samples, the loader state says "
                f"{list(self.state.consumed)}"
            )
        columns = [np.concatenate(c) for c in zip(*pieces, strict=True)]
        return Schedule(*columns)

    def _check_configs(self) -> None:
        """Each segment's recorded config derives the same order inputs; and the run's config.yaml, for its
        latest checkpoint, too (an edited config.yaml would make the next resume read other rows)."""
        from svd.train.trainer import loader_config  # the trainer's own derivation, not a copy of it

        configs = [
            (f"the config recorded at step {s['step']}", s["config"]) for s in self.lineage["segments"]
        ]
        if self.step == (committed_steps(self.run, self.storage) or [None])[-1]:
            fs, path = self.storage.fsspec(join(self.run, "config.yaml"))
            if fs.exists(path):
                configs.append((join(self.run, "config.yaml"), fs.cat_file(path).decode()))
        for where, text in configs:
            try:
                derived = loader_config(from_yaml(text), validation=False)
            except Exception as e:  # OmegaConf's errors: not (or no longer) a run configuration
                raise self._disagrees(f"{where} is not a run configuration ({described(e)})") from e
            found = {
                "data.table": (derived.table, self.lineage["table"]),
                "filter": (derived.filter, self.lineage["filter"]),
                "train.seed": (derived.seed, self.lineage["seed"]),
                "buckets": (derived.shapes(), self.lineage["buckets"]),
            }
            different = [f"{k}: {a!r} there, {b!r} trained" for k, (a, b) in found.items() if a != b]
            if different:
                raise self._disagrees(f"{where} says " + "; ".join(different))

    def _replaced(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """(positions, replacement positions) per bucket, by position; each within the consumed stream."""
        out = {}
        for b in range(len(self.loader.sizes)):
            entries = sorted((p, by) for bucket, p, by, _ in self.lineage["replaced"] if bucket == b)
            positions = np.array([p for p, _ in entries], np.int64)
            if positions.size and (positions.max() >= self.state.consumed[b] or positions.min() < 0):
                raise self._disagrees(f"a replaced position of bucket {b} was never consumed")
            if np.unique(positions).size != positions.size:
                raise self._disagrees(f"a position of bucket {b} is replaced twice")
            out[b] = (positions, np.array([by for _, by in entries], np.int64))
        return out

    # ---- answers -----------------------------------------------------------------------------------------
    def indices(self, bucket: int, positions: np.ndarray) -> np.ndarray:
        """The clips (indices within the bucket) that stream positions read, as the loader computes them."""
        return stream_indices(positions, self.loader.sizes[bucket], bucket_seed(self.state.seed, bucket))

    def _permutation(self, bucket: int, epoch: int) -> EpochPermutation:
        return EpochPermutation(self.loader.sizes[bucket], bucket_seed(self.state.seed, bucket), epoch)

    def reads_of(self, bucket: int, clips: np.ndarray) -> Reads:
        """Every read of these clips (indices within `bucket`) up to the checkpoint, replacements included."""
        n, consumed = self.loader.sizes[bucket], self.state.consumed[bucket]
        clips = np.unique(np.asarray(clips, np.int64))
        index, position = [], []
        for epoch in range(-(-consumed // n) if n else 0):
            at = epoch * n + self._permutation(bucket, epoch).inverse(clips)
            keep = at < consumed
            index.append(clips[keep])
            position.append(at[keep])
        index_all = np.concatenate(index) if index else np.zeros(0, np.int64)
        position_all = np.concatenate(position) if position else np.zeros(0, np.int64)
        replaced_at, replaced_by = self.replaced[bucket]
        kept = ~np.isin(position_all, replaced_at)
        instead = self.indices(bucket, replaced_by) if replaced_by.size else np.zeros(0, np.int64)
        ours = np.isin(instead, clips)
        return Reads(
            bucket,
            np.concatenate([index_all[kept], instead[ours]]),
            np.concatenate([position_all[kept], replaced_at[ours]]),
            np.concatenate([np.zeros(int(kept.sum()), bool), np.ones(int(ours.sum()), bool)]),
        )

    def clip_counts(self, bucket: int, block: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(times seen, first position, last position; −1 when never seen) of a block of clip indices,
        ignoring replacements: once per whole epoch, and in the partial last epoch where its inverse falls."""
        n, consumed = self.loader.sizes[bucket], self.state.consumed[bucket]
        epochs, rest = divmod(consumed, n)
        inverses: dict[int, np.ndarray] = {}

        def at(epoch: int) -> np.ndarray:
            if epoch not in inverses:
                inverses[epoch] = self._permutation(bucket, epoch).inverse(block)
            return inverses[epoch]

        in_last = at(epochs) < rest if rest else np.zeros(block.size, bool)
        times = epochs + in_last.astype(np.int64)
        first = np.where(times > 0, at(0), -1)
        last = (epochs - 1) * n + at(epochs - 1) if epochs else np.full(block.size, -1, np.int64)
        if rest:
            last = np.where(in_last, epochs * n + at(epochs), last)
        return times, first, last

    def clips(self) -> Iterator[pa.RecordBatch]:
        """Every clip this checkpoint trained on (in this stage): clip_id, video_uri, times seen, first and
        last step; blocks of `CLIPS_PER_BLOCK` clips at a time, in table order within each bucket."""
        table = open_table(self.lineage["table"], self.storage, self.state.table_version)
        for b, n in enumerate(self.loader.sizes):
            if not n or not self.state.consumed[b]:
                continue
            exact = self._exact_counts(b)
            for start in range(0, n, CLIPS_PER_BLOCK):
                block = np.arange(start, min(start + CLIPS_PER_BLOCK, n), dtype=np.int64)
                times, first, last = self.clip_counts(b, block)
                ids, e_times, e_first, e_last = exact
                here = (ids >= block[0]) & (ids <= block[-1])
                at = ids[here] - block[0]
                times[at], first[at], last[at] = e_times[here], e_first[here], e_last[here]
                seen = times > 0
                if seen.any():
                    yield self._batch(table, b, block[seen], times[seen], first[seen], last[seen])

    def _exact_counts(self, bucket: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(clips, times, first, last position) for the clips a replacement touched, read by read."""
        replaced_at, replaced_by = self.replaced[bucket]
        if not replaced_at.size:
            return (np.zeros(0, np.int64),) * 4
        touched = np.unique(
            np.concatenate([self.indices(bucket, replaced_at), self.indices(bucket, replaced_by)])
        )
        reads = self.reads_of(bucket, touched)
        order = np.lexsort((reads.position, reads.index))
        index, position = reads.index[order], reads.position[order]
        times = np.zeros(touched.size, np.int64)
        first = np.full(touched.size, -1, np.int64)
        last = np.full(touched.size, -1, np.int64)
        where = np.searchsorted(touched, index)
        np.add.at(times, where, 1)
        if index.size:
            starts = np.flatnonzero(np.r_[True, index[1:] != index[:-1]])
            ends = np.r_[starts[1:], index.size] - 1
            first[where[starts]], last[where[starts]] = position[starts], position[ends]
        return touched, times, first, last

    def _batch(
        self,
        table: lance.LanceDataset,
        bucket: int,
        clips: np.ndarray,
        times: np.ndarray,
        first: np.ndarray,
        last: np.ndarray,
    ) -> pa.RecordBatch:
        rows = self.loader.index.rows(bucket, clips)
        names = table.take(rows.tolist(), columns=["clip_id", "video_uri"])
        first_step = self.schedule.locate(bucket, first)[0]
        last_step = self.schedule.locate(bucket, last)[0]
        return pa.RecordBatch.from_arrays(
            [
                pa.array([self.run] * clips.size, pa.string()),
                pa.array(np.full(clips.size, self.step, np.int64)),
                names.column("clip_id").combine_chunks(),
                names.column("video_uri").combine_chunks(),
                pa.array(times),
                pa.array(first_step),
                pa.array(last_step),
            ],
            schema=CLIP_SCHEMA,
        )

    def find(
        self, *, clip_ids: frozenset[str] = frozenset(), video_uris: frozenset[str] = frozenset()
    ) -> dict[int, np.ndarray]:
        """The clips (indices per bucket) whose clip_id or video_uri is named: a scan of two columns."""
        table = open_table(self.lineage["table"], self.storage, self.state.table_version)
        wanted_ids, wanted_uris = (
            pa.array(sorted(clip_ids), pa.string()),
            pa.array(sorted(video_uris), pa.string()),
        )
        offsets = []
        columns = {"clip_id": "clip_id", "video_uri": "video_uri", "offset": "_rowoffset"}  # as row_index
        for batch in table.scanner(columns=columns, scan_in_order=True).to_batches():
            hit = pc.or_(
                pc.is_in(batch.column("clip_id"), wanted_ids),
                pc.is_in(batch.column("video_uri"), wanted_uris),
            )
            offsets.append(batch.column("offset").to_numpy()[hit.to_numpy(zero_copy_only=False)])
        rows = np.concatenate(offsets).astype(np.int64) if offsets else np.zeros(0, np.int64)
        found = {}
        index = self.loader.index
        for b in range(len(self.loader.sizes)):
            members = index.offsets[index.starts[b] : index.starts[b + 1]]
            at = np.searchsorted(members, rows)
            inside = at < members.size
            hit = (
                inside & (members[np.minimum(at, max(members.size - 1, 0))] == rows)
                if members.size
                else inside
            )
            found[b] = at[hit].astype(np.int64)
        return found

    def summary(self) -> list[str]:
        """The lineage in a few lines: what the answer was recomputed from."""
        lineage = self.lineage
        segments = "; ".join(
            f"from step {s['step'] + 1}: {s['world_size']} rank(s) × {s['batch_sizes']} × {s['accumulation']}"
            for s in lineage["segments"]
        )
        lines = [
            f"{self.folder}: {lineage['table']} version {lineage['table_version']}, "
            f"filter {lineage['filter']!r}, seed {lineage['seed']}; {segments}"
        ]
        for e in lineage["exclusions"]:
            listed = f"{e['uri']} ({e['names']} names, sha256 {e['digest'][:12]})" if e["uri"] else "none"
            lines.append(f"  takedown list from step {e['step'] + 1}: {listed}, set {e['time']}")
        reasons = collections.Counter(reason for *_, reason in lineage["replaced"])
        if reasons:
            lines.append("  positions replaced: " + ", ".join(f"{n} {r}" for r, n in sorted(reasons.items())))
        return lines

    def parent(self) -> Replay | None:
        """The checkpoint this stage started from (`stage.init_from`), when it was a run of ours."""
        source = self.lineage.get("init_from") or {}
        folder = source.get("folder")
        return Replay(folder, self.storage) if folder else None

    def chain(self) -> list[Replay]:
        """This checkpoint and every stage it descends from, nearest first."""
        replays: list[Replay] = [self]
        while (parent := replays[-1].parent()) is not None:
            replays.append(parent)
        return replays


def checkpoint_replay(run: str, step: int | None, storage: Storage) -> Replay:
    """The replay of checkpoint `step` of `run` (its latest when None); it must be committed."""
    steps = committed_steps(run, storage)
    if step is None:
        if not steps:
            raise ProvenanceError(f"{run} has no committed checkpoint")
        step = steps[-1]
    if step not in steps:
        raise ProvenanceError(
            f"{run} has no committed checkpoint at step {step} (committed: {steps or 'none'})"
        )
    return Replay(join(run, "checkpoints", f"step-{step:08d}"), storage)


def checkpoint_clips(run: str, step: int | None, storage: Storage) -> Iterator[pa.RecordBatch]:
    """The clips checkpoint `step` of `run` trained on, through every stage it descends from (`run` and
    `checkpoint` columns say which stage's checkpoint read them). Every lineage of the chain is checked
    before the first batch."""
    chain = checkpoint_replay(run, step, storage).chain()
    return (batch for replay in chain for batch in replay.clips())


READ_SCHEMA = pa.schema(
    [
        ("run", pa.string()),
        ("step", pa.int64()),
        ("rank", pa.int64()),
        ("micro", pa.int64()),
        ("position", pa.int64()),
        ("clip_id", pa.string()),
        ("video_uri", pa.string()),
        ("in_place_of_another", pa.bool_()),  # read where an undecodable or excluded clip was
    ]
)


@dataclass(frozen=True)
class ClipAnswer:
    reads: pa.Table  # READ_SCHEMA, by run (nearest stage first) and step
    checkpoints: dict[str, list[int]]  # committed checkpoints that trained on the clips, per run
    matched: int  # clips of the tables whose clip_id or video_uri was asked for


def clip_reads(
    run: str, step: int | None, storage: Storage, *, clip_ids: frozenset[str], video_uris: frozenset[str]
) -> ClipAnswer:
    """Every step and rank that read the named clips, up to checkpoint `step` (the latest when None), in
    this run and the stages it descends from; and the committed checkpoints that trained on them: a
    run's checkpoints from the first read on, and every checkpoint of the stages that descend from a
    checkpoint that had."""
    chain = checkpoint_replay(run, step, storage).chain()
    batches, checkpoints, matched, inherited = [], {}, 0, False
    for replay in reversed(chain):  # the oldest stage first: a descendant inherits what it trained on
        table = open_table(replay.lineage["table"], replay.storage, replay.state.table_version)
        first = None
        for bucket, clips in replay.find(clip_ids=clip_ids, video_uris=video_uris).items():
            matched += clips.size
            reads = replay.reads_of(bucket, clips)
            if not reads.index.size:
                continue
            steps, ranks, micros = replay.schedule.locate(bucket, reads.position)
            rows = replay.loader.index.rows(bucket, reads.index)
            names = table.take(rows.tolist(), columns=["clip_id", "video_uri"])
            batches.append(
                pa.table(
                    {
                        "run": pa.array([replay.run] * rows.size, pa.string()),
                        "step": steps,
                        "rank": ranks,
                        "micro": micros,
                        "position": reads.position,
                        "clip_id": names.column("clip_id"),
                        "video_uri": names.column("video_uri"),
                        "in_place_of_another": reads.replaced,
                    },
                    schema=READ_SCHEMA,
                )
            )
            first = int(steps.min()) if first is None else min(first, int(steps.min()))
        since = 0 if inherited else first
        if since is not None:
            checkpoints[replay.run] = [s for s in committed_steps(replay.run, storage) if s >= since]
            inherited = True
    reads = pa.concat_tables(batches) if batches else READ_SCHEMA.empty_table()
    return ClipAnswer(reads.sort_by([("step", "ascending"), ("rank", "ascending")]), checkpoints, matched)


@dataclass(frozen=True)
class ExcludeCheck:
    passed: bool
    lines: list[str]  # the proof, or what breaks it


def exclude_check(run: str, step: int | None, exclusion: Exclusion, storage: Storage) -> ExcludeCheck:
    """Whether, by the lineage of checkpoint `step` (the latest when None), no step while `exclusion` was in
    force read one of its clips. In force: from the step after each lineage entry with its digest until the
    next entry that names another list."""
    replay = checkpoint_replay(run, step, storage)
    entries = replay.lineage["exclusions"]
    spans = [
        (entry["step"], entries[i + 1]["step"] if i + 1 < len(entries) else replay.step)
        for i, entry in enumerate(entries)
        if entry["digest"] == exclusion.digest
    ]
    if not spans:
        recorded = ", ".join(f"{e['uri']} from step {e['step']}" for e in entries) or "none"
        return ExcludeCheck(
            False,
            [
                f"{exclusion.uri} (sha256 {exclusion.digest[:12]}) was never in force in the lineage of "
                f"{replay.folder} "
                f"(exclusions recorded: {recorded})"
            ],
        )
    answer = clip_reads(run, replay.step, storage, clip_ids=exclusion.names, video_uris=exclusion.names)
    ours = answer.reads.filter(pc.equal(answer.reads.column("run"), replay.run))
    steps = ours.column("step").to_numpy()
    bad = np.zeros(steps.size, bool)
    for after, until in spans:
        bad |= (steps > after) & (steps <= until)
    in_force = ", ".join(f"steps {a + 1}–{u}" for a, u in spans)
    replaced = sum(1 for entry in replay.lineage["replaced"] if entry[3] == "excluded")
    lines = [
        f"{exclusion.uri}: {len(exclusion.names)} names, {answer.matched} clips of {replay.lineage['table']} "
        f"(version {replay.state.table_version}); in force in {replay.run} for {in_force} "
        f"(lineage of checkpoint {replay.step})",
        f"{int(bad.sum())} reads of them in those steps; {steps.size - int(bad.sum())} outside them; "
        f"{replaced} positions replaced because their clip was excluded",
    ]
    for row in ours.filter(pa.array(bad)).to_pylist()[:20]:
        lines.append(f"read: step {row['step']} rank {row['rank']} {row['clip_id']} ({row['video_uri']})")
    return ExcludeCheck(not bad.any(), lines)
