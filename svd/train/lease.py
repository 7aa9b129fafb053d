"""One owner per run directory (DESIGN decision 9): a lease in `<run_dir>/lease/`, taken by rank 0 before the
run writes anything, renewed while it trains, released when it ends.

    with hold_run_dir(cfg) as owner:      # every rank; rank 0 holds the lease, every rank refuses together
        Trainer(cfg, env, owner=owner).fit()  # owner.confirm() before each write: stops if it was taken

The lease is a sequence of small JSON objects, `lease/00000001.json`, `00000002.json`, …; the highest one is
the current holder. Taking the directory means creating the next one *exclusively* — S3's `If-None-Match: *`,
which AWS S3, Ceph radosgw and moto honour; `link(2)` on a local or shared file system — so of two runs that
find the directory free (or its holder gone) at the same moment, exactly one creates the next object and
the other finds it taken. Only the holder ever rewrites its own object (its heartbeat, its release), so no
compare-and-swap on an existing object is needed: radosgw (Ceph 16) refuses `If-Match` with a quoted ETag
and ignores it on DELETE. Other fsspec stores get fsspec's `mode="create"`, atomic only where the store is.

Who owns it: the launcher names the job in SVD_RUN_OWNER (`RUN_OWNER`) — the Slurm job id, the same after a
requeue; an id of the Ray driver, the same for a restarted worker group; a new id per local launch. A run of
the job that holds the lease takes it back at once: that is the same job, restarted.

A holder that died without releasing (killed, node lost) keeps the directory until its lease expires,
`checkpoint.lease_ttl_s` after its last renewal (it renews every quarter of that). Where the holder's process
id means something — the same boot of the same host, the same pid namespace — a holder whose process has
ended is free at once. `checkpoint.break_lease=true` takes the directory regardless, for a run known to be
dead. Expiry compares the holder's clock with the reader's: hosts keep UTC time (NTP). A holder that was
frozen or cut off from the store past its expiry may find the directory taken when it wakes: it confirms
its lease before each write (checkpoint, validation, previews; rank 0 again before it commits an
asynchronous checkpoint and prunes) and stops there, on every rank, in one line.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fsspec.implementations.local import LocalFileSystem

from svd.config import ConfigError
from svd.data.storage import Storage, join
from svd.errors import described

if TYPE_CHECKING:
    from svd.config import RunConfig

log = logging.getLogger(__name__)

RUN_OWNER = "SVD_RUN_OWNER"  # set by each launcher: the job whose restarts may take the lease back
FOLDER = "lease"
GENERATION = re.compile(r"^(\d{8})\.json$")
TAKE_ATTEMPTS = 8  # rounds of look-then-create when other runs keep taking the next object first


class RunDirInUseError(ConfigError):
    """Another run holds the run directory; the message names it and says when its lease expires."""


class RunDirLostError(ConfigError):
    """Another run took the run directory while this one held it; this one stops before writing more. A
    ConfigError, as `RunDirInUseError`: a requeue would find the directory taken all the same."""


class LeaseError(RuntimeError):
    """The lease objects cannot be read or taken; the message names the URI."""


def run_owner() -> str:
    """The job this process belongs to, as its launcher named it (else a name of this process alone)."""
    return os.environ.get(RUN_OWNER) or f"process-{uuid.uuid4().hex[:12]}"


@dataclass(frozen=True)
class Holder:
    owner: str  # the job (RUN_OWNER)
    token: str  # one taking of the lease: tells this process's lease from a restarted job's
    host: str
    pid: int
    machine: str | None  # where `pid` names a process: this boot of this host, this pid namespace
    since: float  # seconds since the epoch
    renewed: float
    ttl_s: float
    released: bool = False

    @property
    def expires(self) -> float:
        return self.renewed + self.ttl_s

    def describe(self) -> str:
        return f"{self.owner} (host {self.host}, pid {self.pid}, since {utc(self.since)})"

    def process_ended(self) -> bool:
        """True only when this host can tell: same machine, and no process has the holder's pid."""
        return self.machine is not None and self.machine == machine_id() and not process_alive(self.pid)

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), sort_keys=True).encode()

    @staticmethod
    def from_json(data: bytes, uri: str) -> Holder:
        try:
            return Holder(**json.loads(data))
        except (ValueError, TypeError) as e:
            raise LeaseError(f"lease {uri} is not valid: {type(e).__name__}: {e}") from e


class RunDirLease:
    """The lease of one run directory, as one process takes, renews and releases it."""

    def __init__(
        self, run_dir: str, storage: Storage, *, owner: str, ttl_s: float, break_lease: bool = False
    ) -> None:
        if not ttl_s > 0:
            raise ValueError(f"checkpoint.lease_ttl_s={ttl_s} must be > 0")
        self.run_dir = run_dir
        self.owner = owner
        self.ttl_s = ttl_s
        self.break_lease = break_lease
        self.storage = storage
        self.folder = _LeaseFolder(join(run_dir, FOLDER), storage)
        self.generation: int | None = None  # of the object this process holds
        self.holder: Holder | None = None
        self.lost = False  # another run took it while this process held it
        self.lost_to: Holder | None = None  # that run, when its lease object could be read
        self.renew_failures = 0  # heartbeats that could not be written (retried at the next one)
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def acquire(self) -> str | None:
        """Take the lease, or raise RunDirInUseError naming its holder. Returns a line to print when the
        directory was taken from another holder: the same job restarted, an ended or expired one, or by
        break_lease. The store's own errors come back as one LeaseError naming the run directory (and the
        deadlines to raise when it did not answer in time): it is the run's first call to that store."""
        try:
            return self._take()
        except (RunDirInUseError, LeaseError):
            raise
        except Exception as e:  # any storage client's error
            raise LeaseError(
                f"checkpoint.run_dir={self.run_dir}: cannot take its lease in {self.folder.uri} "
                f"({described(e)}){self.storage.timeout_hint(e)}"
            ) from e

    def _take(self) -> str | None:
        token, note = uuid.uuid4().hex, None
        for _ in range(TAKE_ATTEMPTS):
            generations = self.folder.generations()
            current = self.folder.read(generations[-1]) if generations else None
            if generations and current is None:
                continue  # pruned while we looked
            if current is not None and current.token == token:  # ours: a create whose answer was lost
                return self._hold(generations[-1], current, generations, note)
            note = self._why_free(current)
            now = time.time()
            host, pid = socket.gethostname(), os.getpid()
            mine = Holder(self.owner, token, host, pid, machine_id(), now, now, self.ttl_s)
            following = generations[-1] + 1 if generations else 1
            if self.folder.create(following, mine):
                return self._hold(following, mine, generations, note)
        raise LeaseError(
            f"could not take the lease of checkpoint.run_dir={self.run_dir}: {TAKE_ATTEMPTS} times another "
            "run took it first"
        )

    def release(self) -> None:
        """Stop renewing; mark the lease released so the next run takes the directory at once. Safe to call
        when it was never taken; leaves alone a lease someone else took meanwhile."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        if self.generation is None or self.holder is None or self.lost:
            return
        try:
            self.folder.write(
                self.generation, dataclasses.replace(self.holder, renewed=time.time(), released=True)
            )
        except OSError as e:
            log.warning(
                "lease: could not release %s (%s): it expires at %s",
                self.folder.uri,
                described(e),
                utc(self.holder.expires),
            )
        self.generation = None

    def confirm(self) -> None:
        """Before the run writes: raise RunDirLostError when another run took the directory since this one
        did (its lease expired while this run was frozen or cut off from the store, or break_lease)."""
        if not self.lost:
            self._look_for_newer()
        if self.lost:
            by = self.lost_to.describe() if self.lost_to else "another run"
            raise RunDirLostError(
                f"checkpoint.run_dir={self.run_dir} was taken by {by} after this run's lease expired at "
                f"{utc(self.holder.expires)}: this run stops without writing there again"
            )

    def _look_for_newer(self) -> bool:
        """True (and `lost`, `lost_to` set) when a lease object newer than this run's exists."""
        newest = self.folder.generations()[-1:]
        if not newest or newest[0] <= self.generation:
            return False
        self.lost, self.lost_to = True, self.folder.read(newest[0])
        return True

    def _why_free(self, current: Holder | None) -> str | None:
        """Why `current` does not keep this run out (a line to print, or None); else RunDirInUseError."""
        if current is None or current.released:
            return None
        where = f"checkpoint.run_dir={self.run_dir}"
        if current.owner == self.owner:
            return f"{where}: taken back from an earlier run of the same job, {current.describe()}"
        taken = f"{where}: taken from {current.describe()}"
        if current.expires <= time.time():
            return f"{taken}, whose lease expired at {utc(current.expires)}"
        if current.process_ended():
            return f"{taken}, whose process has ended"
        if self.break_lease:
            return f"{taken}, as checkpoint.break_lease=true asks"
        raise RunDirInUseError(
            f"checkpoint.run_dir={self.run_dir} is in use by {current.describe()}; its lease expires at "
            f"{utc(current.expires)} unless that run renews it: wait for it to end, choose another "
            "checkpoint.run_dir, or set checkpoint.break_lease=true if it is gone"
        )

    def _hold(self, generation: int, holder: Holder, earlier: list[int], note: str | None) -> str | None:
        self.generation, self.holder = generation, holder
        for old in earlier:
            if old < generation:
                self.folder.delete(old)
        self._stop.clear()
        self._heartbeat = threading.Thread(target=self._renew_until_released, name="lease", daemon=True)
        self._heartbeat.start()
        return note

    def _renew_until_released(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                if self._look_for_newer():
                    log.error(
                        "lease: checkpoint.run_dir=%s was taken by %s: this run no longer owns it",
                        self.run_dir,
                        self.lost_to.describe() if self.lost_to else "another run",
                    )
                    return
                self.holder = dataclasses.replace(self.holder, renewed=time.time())
                self.folder.write(self.generation, self.holder)
            except Exception as e:  # the heartbeat must outlive any storage error: count it, try again
                self.renew_failures += 1
                log.warning(
                    "lease: renewing %s failed (%s); it expires at %s unless a later try succeeds",
                    self.folder.uri,
                    described(e),
                    utc(self.holder.expires),
                )


@dataclass(frozen=True)
class RunDirOwner:
    """What a rank holding (through rank 0) the run directory checks before it writes there."""

    lease: RunDirLease | None  # rank 0's; None on the other ranks

    def confirm(self) -> None:
        """Every rank (a collective): RunDirLostError on every rank when another run took the directory."""
        from svd.collectives import decided_by_rank0

        decided_by_rank0(self.lease.confirm if self.lease else None)

    def confirm_here(self) -> None:
        """This rank alone, no collective (rank 0's checkpoint commit thread): a no-op on other ranks."""
        if self.lease is not None:
            self.lease.confirm()


@contextmanager
def hold_run_dir(cfg: RunConfig, storage: Storage | None = None) -> Iterator[RunDirOwner]:
    """Every rank, before the run writes anything: rank 0 takes the lease of `checkpoint.run_dir` and holds it
    until the block ends (by return, error or stop signal); when it cannot, every rank raises its error, so
    none is left waiting in a collective. Yields the `RunDirOwner` to confirm before each write."""
    from svd.collectives import decided_by_rank0, is_rank0  # torch: not for the launchers' import

    lease = None
    if is_rank0():
        lease = RunDirLease(
            cfg.checkpoint.run_dir,
            storage or Storage.from_env(),
            owner=run_owner(),
            ttl_s=cfg.checkpoint.lease_ttl_s,
            break_lease=cfg.checkpoint.break_lease,
        )
    try:
        note = decided_by_rank0(lease.acquire if lease else None)
        if lease and note:
            print(f"lease: {note}", flush=True)
        yield RunDirOwner(lease)
    finally:
        if lease is not None:
            lease.release()


class _LeaseFolder:
    """The lease objects of one run directory, on any fsspec filesystem."""

    def __init__(self, uri: str, storage: Storage) -> None:
        self.uri = uri
        self.fs, self.path = storage.fsspec(uri)
        self.local = isinstance(self.fs, LocalFileSystem)

    def generations(self) -> list[int]:
        self.fs.invalidate_cache(self.path)  # other processes write here; s3fs caches listings
        try:
            names = self.fs.ls(self.path, detail=False)
        except FileNotFoundError:
            return []
        found = (GENERATION.match(name.rstrip("/").rsplit("/", 1)[-1]) for name in names)
        return sorted(int(m[1]) for m in found if m)

    def read(self, generation: int) -> Holder | None:
        """None when the object is gone (pruned by a newer holder)."""
        try:
            data = self.fs.cat_file(self._path(generation))
        except FileNotFoundError:
            return None
        return Holder.from_json(data, join(self.uri, f"{generation:08d}.json"))

    def create(self, generation: int, holder: Holder) -> bool:
        """Write `holder` as `generation` unless that object exists (then False), atomically."""
        path = self._path(generation)
        if self.local:
            Path(self.path).mkdir(parents=True, exist_ok=True)
            staged = f"{path}.{uuid.uuid4().hex}.tmp"
            Path(staged).write_bytes(holder.to_json())
            try:
                os.link(staged, path)  # fails if `path` exists, and shows it whole or not at all
            except FileExistsError:
                return False
            finally:
                os.unlink(staged)
            return True
        try:
            self.fs.pipe_file(path, holder.to_json(), mode="create")
        except FileExistsError:
            return False
        except OSError as e:
            if _precondition_failed(e):
                return False
            raise
        return True

    def write(self, generation: int, holder: Holder) -> None:
        """Rewrite the object this process holds (no one else writes it)."""
        path = self._path(generation)
        if self.local:
            staged = f"{path}.{uuid.uuid4().hex}.tmp"
            Path(staged).write_bytes(holder.to_json())
            os.replace(staged, path)
        else:
            self.fs.pipe_file(path, holder.to_json())

    def delete(self, generation: int) -> None:
        """Best effort: a leftover older object is never read (only the newest is)."""
        try:
            self.fs.rm_file(self._path(generation))
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("lease: could not delete %s/%08d.json: %s", self.uri, generation, described(e))

    def _path(self, generation: int) -> str:
        return f"{self.path}/{generation:08d}.json"


def _precondition_failed(error: OSError) -> bool:
    """s3fs turns HTTP 412 into FileExistsError only when the server names the condition (moto does,
    radosgw does not): look at the S3 error code underneath."""
    response = getattr(error.__cause__, "response", None) or {}
    return response.get("Error", {}).get("Code") in ("PreconditionFailed", "412")


def machine_id() -> str | None:
    """This boot of this host and this pid namespace, where a process id names one process; None where
    Linux's /proc cannot tell."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None
    return f"{boot}/{namespace}"


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))
