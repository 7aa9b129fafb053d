"""Distributed checkpoints of a training run in any storage a URI names (local path, file://, s3://).

    ckpt = Checkpointer("s3://bucket/runs/r1", storage, keep=3, async_save=True)
    parts = {"train": ModelOptimizerState(model, optimizer), "ema": ema_tensors, "data": loader_state}
    step = ckpt.load(parts) or 0                  # resume in place (any world size), None when fresh
    ...
    blocked_s = ckpt.save(step, parts)            # every rank; training goes on while it copies and uploads
    ckpt.wait_for_staging()                       # before changing saved state (the optimizer step)
    ckpt.close()                                  # every rank: finish the last save

    weights = read_full_state("s3://bucket/runs/r1", "ema", storage)   # no process group needed
    folder = checkpoint_folder("s3://bucket/runs/r1", storage)          # its latest step folder
    read_state(folder, {"ema.w": sharded_w}, storage)                  # every rank reads its shards only

Layout: `<run>/checkpoints/step-00000100/` holds torch.distributed.checkpoint (DCP) files, one per rank
plus `.metadata`; `<run>/checkpoints/latest` is a small JSON marker (step, folder, time, world size).
DCP writes `.metadata` only after every rank wrote its data, and rank 0 writes the marker only after that,
so the marker never names a torn folder: a crash mid-save leaves the previous checkpoint the latest one.
Folders the marker does not name are never read.

Parts: each value is a `Stateful` (its `state_dict()` is saved, `load_state_dict()` restores it) or a plain
dict. Values holding tensors (model, optimizer, EMA, sharded or not) go through DCP tensor by tensor and
reshard on load. Values without tensors (loader state, seeds) are stored as one JSON document per part,
so their keys may change between save and load (DCP would otherwise only fill keys the empty target
already has). They must be the same on every rank: DCP keeps one copy of a non-tensor value per key.
"""

from __future__ import annotations

import io
import json
import logging
import re
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import IO, Any

import fsspec
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from fsspec.implementations.local import LocalFileSystem

# Private on purpose, the only two: torch (2.13) publishes DCP's file-system reader and writer for local paths
# only (`dcp.FileSystemReader/Writer`); its fsspec pair, which every object-store user of DCP goes through,
# lives in `_fsspec_filesystem`. We hand it the filesystem `Storage` built (endpoint, credentials, the
# deadlines of DESIGN decision 8) instead of the one it would infer from the URL. `flatten_state_dict` is
# how DCP itself names a nested key in `.metadata`; `_check_keys` must name keys the same way.
from torch.distributed.checkpoint._fsspec_filesystem import FileSystem, FsspecReader, FsspecWriter
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from svd.config import ParallelConfig
from svd.data.storage import Storage, join, write_whole
from svd.errors import described
from svd.train.staging import ReusingStager

log = logging.getLogger(__name__)

MARKER = "latest"
STEP_FOLDER = re.compile(r"^step-(\d{8})$")
Part = Stateful | dict[str, Any]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written, found or matched; the message names the URI or keys."""


class ModelOptimizerState(Stateful):
    """Model and optimizer as one part. `get_state_dict` gives DTensor shards for FSDP2 models (plain tensors
    otherwise) and optimizer state keyed by parameter name, which is what lets DCP reshard both."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optim": optim_state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state_dict["model"],
            optim_state_dict=state_dict["optim"],
        )


class Checkpointer:
    """Saves and restores the parts of a run under `<run_uri>/checkpoints/`. Every method is called on every
    rank. With a process group, the constructor creates a gloo group of its own (a collective: construct it
    on all ranks at the same point), so background saves never interleave with training collectives. Its
    collectives (the storage probe, DCP's planning and commit, in the async save's thread too) give up after
    `collective_timeout_s`, like the training's: torch's default for a new group is 30 minutes, so a frozen
    rank would hold the run (a rank that times out in training still waits for its save in flight)."""

    def __init__(
        self,
        run_uri: str,
        storage: Storage | None = None,
        *,
        keep: int | None = 3,
        async_save: bool = True,
        process_group: dist.ProcessGroup | None = None,
        collective_timeout_s: float = ParallelConfig.collective_timeout_s,
        before_commit: Callable[[], None] | None = None,
    ):
        if keep is not None and keep < 1:
            raise ValueError(f"checkpoint.keep={keep} must be ≥ 1 (or None to keep every checkpoint)")
        self.uri = join(run_uri, "checkpoints")
        self.keep = keep
        self.async_save = async_save
        self.prune_failures = 0  # old checkpoints that could not be deleted (retried at the next commit)
        self._storage = storage or Storage.from_env()
        self._fs, self._path = self._storage.fsspec(self.uri)
        self._collective_timeout_s = collective_timeout_s
        # Rank 0, before the marker and pruning: may raise to keep a run that lost its run directory out.
        self._before_commit = before_commit or (lambda: None)
        if dist.is_available() and dist.is_initialized():
            timeout = timedelta(seconds=collective_timeout_s)
            self._pg = process_group or dist.new_group(backend="gloo", timeout=timeout)
            self._rank, self._world = dist.get_rank(self._pg), dist.get_world_size(self._pg)
        else:
            self._pg, self._rank, self._world = None, 0, 1
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-commit")
        # One stager for the run: it keeps its CPU copy of the state between saves and refreshes it in one
        # call (`ReusingStager`), beside the next forward and backward, which read the weights but do not
        # change them: the loop waits for the copy (`wait_for_staging`) only before it changes them.
        self._stager = ReusingStager()
        self._pending: Future[None] | None = None
        self._staging: Future[None] | None = None
        self._last_step: int | None = None
        self._probe_storage()

    def save(
        self, step: int, parts: Mapping[str, Part], on_commit: Callable[[int], None] | None = None
    ) -> float:
        """Checkpoint `parts` as of `step`; returns the seconds it blocked the caller. In async mode it waits
        for the previous save and returns while threads copy the state to CPU memory and write it; the caller
        calls `wait_for_staging` before it changes any of `parts`. Rank 0 then writes the marker and deletes
        old checkpoints. `on_commit(step)` is called once the checkpoint is complete (in async mode from the
        commit thread; never for a save that fails). A save of the step last saved or loaded is a no-op (the
        state is the same)."""
        started = time.perf_counter()
        self.wait()
        if self._last_step is not None and step <= self._last_step:
            if step == self._last_step:
                return time.perf_counter() - started
            raise CheckpointError(f"step {step} is before the last checkpoint step {self._last_step}")
        state = _to_dcp(parts)
        writer = _Writer(self._fs, self._step_path(step), sync_files=_is_local(self._fs))
        if self.async_save:
            response = dcp.async_save(
                state,
                storage_writer=writer,
                process_group=self._pg,
                async_stager=self._stager,
                no_dist=self._pg is None,
            )
            self._staging = response.staging_completion
            self._pending = self._executor.submit(
                self._commit_when_written, response.upload_completion, step, on_commit
            )
        else:
            try:
                with _single_process_is_intended():
                    dcp.save(state, storage_writer=writer, process_group=self._pg, no_dist=self._pg is None)
            except (Exception, CheckpointException) as e:  # DCP's exception is a BaseException
                raise CheckpointError(f"saving {self._step_uri(step)} failed: {self._describe(e)}") from e
            self._commit(step)
            if on_commit is not None:
                on_commit(step)
        self._last_step = step
        return time.perf_counter() - started

    def wait_for_staging(self) -> None:
        """Return once the save in flight holds its own copy of the state, so the caller may change it."""
        staging, self._staging = self._staging, None
        if staging is not None and staging.exception() is not None:
            self.wait()  # the upload failed with it: raised as a CheckpointError, once

    def wait(self) -> None:
        """Finish the save in flight (data, marker, pruning); raise its error, once."""
        self._staging = None
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._executor.shutdown(wait=True)
            self._stager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # finish the save in flight, but let the error that ended the block be the one raised
            self.close()
        except CheckpointError as e:
            log.error("the checkpoint in flight failed too: %s", e)

    def latest_step(self) -> int | None:
        """The step the marker names, None when there is no marker (a fresh run)."""
        marker = self.latest_marker()
        return None if marker is None else marker["step"]

    def latest_marker(self) -> dict[str, Any] | None:
        """The marker's step, folder and world size (None in markers written before it was recorded)."""
        return _read_marker(self._fs, f"{self._path}/{MARKER}", join(self.uri, MARKER))

    def load(self, parts: Mapping[str, Part]) -> int | None:
        """Restore `parts` in place from the latest complete checkpoint and return its step; None when there
        is none. Works on any world size: DCP reads each rank's shards from whichever files hold them."""
        self.wait()
        step = self.latest_step()
        if step is None:
            return None
        reader = _open_reader(self._fs, self._step_path(step), self._step_uri(step))
        state = _to_dcp(parts)
        _check_keys(state, reader.read_metadata(), self._step_uri(step))
        try:
            with _single_process_is_intended():
                dcp.load(state, storage_reader=reader, process_group=self._pg, no_dist=self._pg is None)
        except (Exception, CheckpointException) as e:
            raise CheckpointError(f"loading {self._step_uri(step)} failed: {self._describe(e)}") from e
        _from_dcp(state, parts)
        self._last_step = step
        return step

    def _commit_when_written(
        self, future: Future, step: int, on_commit: Callable[[int], None] | None
    ) -> None:
        try:
            future.result()
        except (Exception, CheckpointException) as e:
            raise CheckpointError(f"saving {self._step_uri(step)} failed: {self._describe(e)}") from e
        self._commit(step)
        if on_commit is not None:
            on_commit(step)

    def _commit(self, step: int) -> None:
        """Rank 0, once every rank's data and DCP's metadata are written: point the marker at `step`, then
        prune. DCP's save returns on any rank only after the coordinator wrote `.metadata`."""
        if self._rank != 0:
            return
        self._before_commit()
        marker = {
            "step": step,
            "folder": f"step-{step:08d}",
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            "world_size": self._world,
        }
        try:
            write_whole(self._fs, f"{self._path}/{MARKER}", json.dumps(marker).encode())
        except OSError as e:
            raise CheckpointError(f"writing {join(self.uri, MARKER)} failed: {self._describe(e)}") from e
        log.info("checkpoint %s committed", self._step_uri(step))
        self._prune(step)

    def _prune(self, latest: int) -> None:
        """Keep the `keep` newest folders up to `latest`; delete the rest, including folders after `latest`
        (torn saves of a run that crashed and resumed from an earlier step)."""
        if self.keep is None:
            return
        steps = sorted(self._step_folders(), reverse=True)
        kept = [s for s in steps if s <= latest][: self.keep]
        for step in steps:
            if step in kept or step == latest:
                continue
            try:
                self._fs.rm(self._step_path(step), recursive=True)
            except OSError as e:
                self.prune_failures += 1
                log.warning("could not delete old checkpoint %s: %s", self._step_uri(step), self._describe(e))

    def _step_folders(self) -> list[int]:
        self._fs.invalidate_cache(self._path)  # other processes write here; s3fs caches listings
        try:
            names = self._fs.ls(self._path, detail=False)
        except FileNotFoundError:
            return []
        return [int(m[1]) for name in names if (m := STEP_FOLDER.match(name.rstrip("/").rsplit("/", 1)[-1]))]

    def _step_path(self, step: int) -> str:
        return f"{self._path}/step-{step:08d}"

    def _step_uri(self, step: int) -> str:
        return join(self.uri, f"step-{step:08d}")

    def _probe_storage(self) -> None:
        """Fail at start, on every rank and in one line naming the URI, rather than at the first save hours
        later: each rank writes a probe there, and each must see rank 0's (a local path on several nodes
        would scatter one checkpoint over their disks)."""
        probe = f"{self._path}/.probe-rank{{}}"
        try:
            if _is_local(self._fs):
                self._fs.makedirs(self._path, exist_ok=True)
            self._fs.pipe_file(probe.format(self._rank), b"")
            error = None
        except OSError as e:
            error = f"cannot write checkpoints to {self.uri}: {self._describe(e)}"
        self._raise_on_every_rank(error)
        self._fs.invalidate_cache(self._path)
        shared = self._fs.exists(probe.format(0))
        self._raise_on_every_rank(
            None if shared else f"rank {self._rank} does not see rank 0's files in {self.uri}"
        )
        self._fs.rm_file(probe.format(self._rank))

    def _describe(self, error: BaseException) -> str:
        return _describe_failure(
            error, self._storage, self._collective_timeout_s if self._pg is not None else None
        )

    def _raise_on_every_rank(self, error: str | None) -> None:
        """One rank's failure raised on all of them, so none waits for the others in a later collective."""
        errors = [error]
        if self._pg is not None:
            errors = [None] * self._world
            try:
                dist.all_gather_object(errors, error, group=self._pg)
            except RuntimeError as e:  # torch's distributed errors, a timeout included
                raise CheckpointError(
                    f"checking {self.uri} with the other ranks failed: {self._describe(e)}"
                ) from e
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise CheckpointError(first)


def checkpoint_folder(uri: str, storage: Storage | None = None) -> str:
    """The step folder `uri` names: itself when it holds DCP's `.metadata`, else the folder of the run's
    latest checkpoint. Resolve it once and hand it to every rank: a run that is still training moves its
    marker, and ranks that each resolved it could read different steps."""
    fs, path = (storage or Storage.from_env()).fsspec(uri)
    fs.invalidate_cache(path)
    if fs.exists(f"{path}/.metadata"):
        return uri
    marker = _read_marker(fs, f"{path}/checkpoints/{MARKER}", join(uri, "checkpoints", MARKER))
    if marker is None:
        raise CheckpointError(f"no checkpoint at {uri}: neither DCP's .metadata nor checkpoints/{MARKER}")
    return join(uri, "checkpoints", marker["folder"])


def saved_tensors(folder: str, storage: Storage | None = None) -> dict[str, TensorStorageMetadata]:
    """Shape and dtype of every tensor saved in a step folder, by key (`"ema.weights.network.…"`)."""
    fs, path = (storage or Storage.from_env()).fsspec(folder)
    entries = _open_reader(fs, path, folder).read_metadata().state_dict_metadata
    return {key: entry for key, entry in entries.items() if isinstance(entry, TensorStorageMetadata)}


def read_full_state(uri: str, prefix: str, storage: Storage | None = None) -> dict[str, torch.Tensor]:
    """The consolidated CPU tensors of one part (`"ema"`, or `"train.model"` for the model inside a
    `ModelOptimizerState` saved as `"train"`), keyed by the name below `prefix`. `uri` is a run (its latest
    checkpoint) or one step folder. Reads in this process only: no process group, none of its collectives,
    so one rank or an export job can call it."""
    folder = checkpoint_folder(uri, storage)
    entries = {
        key: entry for key, entry in saved_tensors(folder, storage).items() if key.startswith(f"{prefix}.")
    }
    if not entries:
        raise CheckpointError(f"{folder} has no tensors under {prefix!r}")
    state = {key: torch.empty(entry.size, dtype=entry.properties.dtype) for key, entry in entries.items()}
    fs, path = (storage or Storage.from_env()).fsspec(folder)
    _load(state, _open_reader(fs, path, folder), folder, no_dist=True)
    return {key.removeprefix(f"{prefix}."): tensor for key, tensor in state.items()}


def read_part(
    folder: str, name: str, storage: Storage | None = None, *, missing_ok: bool = False
) -> dict[str, Any]:
    """A tensor-free part (`"data"`: the loader state and lineage) of a step folder, in this process.
    `missing_ok`: {} for a folder without it, as a checkpoint of weights alone (written by an importer or by
    hand: `stage.init_from` takes those too)."""
    fs, path = (storage or Storage.from_env()).fsspec(folder)
    reader = _open_reader(fs, path, folder)
    if name not in reader.read_metadata().state_dict_metadata:
        if missing_ok:
            return {}
        raise CheckpointError(f"{folder} has no part {name!r}")
    state: dict[str, Any] = {name: ""}
    _load(state, reader, folder, no_dist=True)
    return json.loads(state[name])


def read_state(folder: str, state: dict[str, torch.Tensor], storage: Storage | None = None) -> None:
    """Fill `state` in place from a step folder (`checkpoint_folder`): keys are the checkpoint's, values
    plain tensors or DTensors sharded like a model's (`torch.empty_like` of its state dict). With a process
    group it is a collective, and each rank reads only the chunks its shards cover, and of them only the
    bytes of the keys asked for (`_RangeReader`): a sharded model starting from a 1.5B-parameter run reads
    1/world of its weights and EMA per rank instead of all of them."""
    fs, path = (storage or Storage.from_env()).fsspec(folder)
    reader = _open_reader(fs, path, folder, kind=_RangeReader)
    _load(state, reader, folder, no_dist=not (dist.is_available() and dist.is_initialized()))


def _load(state: dict[str, Any], reader: FsspecReader, uri: str, *, no_dist: bool) -> None:
    try:
        with _single_process_is_intended():
            dcp.load(state, storage_reader=reader, no_dist=no_dist)
    except (Exception, CheckpointException) as e:
        raise CheckpointError(f"loading {uri} failed: {_describe_failure(e)}") from e


class _Filesystem(FileSystem):
    """DCP's fsspec adapter over a filesystem we built (credentials and endpoint from `Storage`) instead of
    one it infers from the URL and the environment."""

    def __init__(self, fs: fsspec.AbstractFileSystem):
        self.fs = fs

    def init_path(self, path: str, **kwargs: Any) -> str:
        return path


class _Writer(FsspecWriter):
    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, **kwargs: Any):
        super().__init__(path, **kwargs)
        self.fs = _Filesystem(fs)


class _Reader(FsspecReader):
    def __init__(self, fs: fsspec.AbstractFileSystem, path: str):
        super().__init__(path)
        self.fs = _Filesystem(fs)


class _RangeReader(_Reader):
    """Reads exactly the byte ranges of the items in this rank's plan, all at once (concurrently where the
    file system is asynchronous, as s3fs is). DCP's own reader goes through a file object that reads ahead
    (50 MB on s3fs), so a rank that needs some of a file's items (the model and EMA, not the optimizer state
    saved between them) would fetch all of it. Holds this rank's share of the bytes in memory at once.
    `_slice_file` is DCP's hook for an item's bytes (private, like the reader it belongs to)."""

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        items = [self.storage_data[item.storage_index] for item in plan.items]
        wanted = sorted({(item.relative_path, item.offset, item.length) for item in items})
        paths = [f"{self.path}/{relative}" for relative, _, _ in wanted]
        starts = [offset for _, offset, _ in wanted]
        ends = [offset + length for _, offset, length in wanted]
        blobs = self.fs.fs.cat_ranges(paths, starts, ends, on_error="raise") if wanted else []
        self._fetched = {(rel, offset): blob for (rel, offset, _), blob in zip(wanted, blobs, strict=True)}
        try:
            return super().read_data(plan, planner)
        finally:
            self._fetched = {}

    def _slice_file(self, file: IO[bytes], sinfo: Any) -> IO[bytes]:
        return io.BytesIO(self._fetched[(sinfo.relative_path, sinfo.offset)])


def _open_reader(
    fs: fsspec.AbstractFileSystem, path: str, uri: str, *, kind: type[_Reader] = _Reader
) -> _Reader:
    fs.invalidate_cache(path)  # written by other processes; s3fs caches listings
    if not fs.exists(f"{path}/.metadata"):
        raise CheckpointError(f"{uri} is incomplete: DCP's .metadata is missing")
    return kind(fs, path)


def _to_dcp(parts: Mapping[str, Part]) -> dict[str, Any]:
    """The state dict DCP sees: each part's tensors as they are, a tensor-free part as one JSON string."""
    state: dict[str, Any] = {}
    for name, part in parts.items():
        if not name or "." in name:
            raise ValueError(f"checkpoint part name {name!r} must be non-empty and without '.'")
        value = part.state_dict() if isinstance(part, Stateful) else part
        if _has_tensor(value):
            state[name] = value
            continue
        try:
            state[name] = json.dumps(value, sort_keys=True)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint part {name!r} holds no tensors and is not JSON: {e}") from e
    return state


def _from_dcp(state: dict[str, Any], parts: Mapping[str, Part]) -> None:
    """Hand loaded values back: DCP filled tensors in place; Statefuls get `load_state_dict`, plain dicts of
    JSON values are replaced in place."""
    for name, part in parts.items():
        value = json.loads(state[name]) if isinstance(state[name], str) else state[name]
        if isinstance(part, Stateful):
            part.load_state_dict(value)
        elif value is not part:
            part.clear()
            part.update(value)


def _check_keys(state: dict[str, Any], metadata: Metadata, uri: str) -> None:
    """DCP fails on the first key missing from a checkpoint and ignores extra ones; name all kinds of
    mismatch up front, in one line."""
    wanted, saved = flatten_state_dict(state)[0], metadata.state_dict_metadata
    missing, unexpected = sorted(wanted.keys() - saved.keys()), sorted(saved.keys() - wanted.keys())
    reshaped = [
        f"{key} {tuple(saved[key].size)}→{tuple(value.shape)}"
        for key, value in sorted(wanted.items())
        if key in saved
        and isinstance(value, torch.Tensor)
        and isinstance(saved[key], TensorStorageMetadata)
        and tuple(saved[key].size) != tuple(value.shape)
    ]
    problems = [
        f"{kind} {keys[:3]} ({len(keys)} in all)"
        for kind, keys in (("missing", missing), ("unexpected", unexpected), ("reshaped", reshaped))
        if keys
    ]
    if problems:
        raise CheckpointError(f"{uri} does not match the parts: {'; '.join(problems)}")


def _has_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, Mapping):
        return any(_has_tensor(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_has_tensor(v) for v in value)
    return False


def _read_marker(fs: fsspec.AbstractFileSystem, path: str, uri: str) -> dict[str, Any] | None:
    """The marker's step, folder and world size; None only when it does not exist (any other read error
    propagates)."""
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        return None
    try:
        marker = json.loads(data)
        world_size = marker.get("world_size")
        return {
            "step": int(marker["step"]),
            "folder": str(marker["folder"]),
            "world_size": None if world_size is None else int(world_size),
        }
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint marker {uri} is not valid: {_describe_failure(e)}") from e


@contextmanager
def _single_process_is_intended() -> Iterator[None]:
    """DCP warns on every call without a process group that it assumes one process; here that is the intent.
    (The async save's thread still warns: warning filters are per process, not per thread.)"""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        yield


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def _describe_failure(
    error: BaseException, storage: Storage | None = None, collective_timeout_s: float | None = None
) -> str:
    """An error as one line; for DCP's multi-rank report, the lowest failing rank's error. A storage error
    that ran out of time names the storage deadlines to raise; a collective that timed out (a RuntimeError,
    which DCP raises as it is: a rank stopped answering) names the setting that bounded the wait."""
    if isinstance(error, CheckpointException) and error.failures:
        rank, (cause, _) = min(error.failures.items(), key=lambda item: item[0])
        others = len(error.failures) - 1
        cause_text = _describe_failure(cause, storage, collective_timeout_s)
        return f"rank {rank}: {cause_text}" + (f" (and {others} more ranks)" if others else "")
    text = described(error)
    if isinstance(error, RuntimeError):  # torch's distributed errors; storage clients raise others
        if collective_timeout_s is None or "timed out" not in text.lower():
            return text
        return f"{text} (a rank did not answer within parallel.collective_timeout_s={collective_timeout_s:g})"
    return text + (storage.timeout_hint(error) if storage is not None else "")
