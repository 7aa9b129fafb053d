"""Processes on this host: `gpus_per_node` ranks found through a rendezvous on 127.0.0.1.

One rank runs in this process (no start-up cost: the demo and quick runs). Several are started by
PyTorch's elastic agent (what `torchrun` uses): it sets the torch.distributed environment of each rank,
and when one rank dies it stops the others and reports the failure, so a broken run ends instead of
hanging. Every rank then calls `svd.train.run`, like under Slurm or Ray.

Stopping: SIGTERM or Ctrl-C makes every rank finish the step under way, save it and return; the run ends with
status 130 (`svd.train.stop`), and the same command resumes it. The signal may reach the ranks themselves (a
terminal's Ctrl-C and Slurm signal every process) or only this process (Kubernetes signals a container's main
process): the elastic agent does not pass a signal on (its own handling kills the ranks once its
`shutdown_timeout` is over, and loses their results), so this process handles SIGTERM and SIGINT itself and
tells the ranks through an event they poll at each step. A second Ctrl-C ends the ranks at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from svd.config import RunConfig, from_yaml, to_yaml
from svd.data.local_s3 import free_port
from svd.environ import scoped_environ
from svd.train import run
from svd.train.lease import RUN_OWNER
from svd.train.stop import STOP_SIGNALS, STOPPED_STATUS, StopRequest, interruptible, stopped_line
from svd.train.trainer import TrainResult

if TYPE_CHECKING:
    from multiprocessing.synchronize import Event

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

# The signals torch's elastic agent still handles as its own (it ends the ranks): all it handles but ours
AGENT_SIGNALS = "SIGHUP,SIGQUIT"
# torch's loggers that describe a rank's failure in dozens of lines; the launcher names it in one
ELASTIC_LOGGERS = ("torch.distributed.elastic", "torch.multiprocessing")


def _rank_main(config_yaml: str, launcher_stop: Event) -> TrainResult:
    """A rank under the elastic agent stops on its own signals, or when the launcher sets `launcher_stop`."""
    with _polling(launcher_stop).on_signals(STOP_SIGNALS) as stop:
        return run(from_yaml(config_yaml), stop)


def _polling(launcher_stop: Event) -> StopRequest:
    return StopRequest(poll=lambda: "the launcher's stop request" if launcher_stop.is_set() else None)


def dry_run(cfg: RunConfig) -> str:
    port = cfg.launcher.master_port or "a free port"
    if cfg.gpus_per_node == 1:
        return "1 rank in this process"
    return (
        f"{cfg.gpus_per_node} processes on this host under torch's elastic agent, rendezvous 127.0.0.1:{port}"
    )


def launch(cfg: RunConfig) -> int:
    """Train until done (status 0), stopped by SIGTERM or SIGINT after saving the step under way (130), or
    failed (1); the last line says which."""
    with _quiet_after_a_hard_quit():  # first: the event below starts multiprocessing's resource tracker
        return _launch_until_stopped(cfg)


def _launch_until_stopped(cfg: RunConfig) -> int:
    stop = multiprocessing.get_context("spawn").Event()  # spawned ranks inherit it
    try:
        with interruptible(lambda _signum: stop.set(), _end_children) as interruption:
            result = launch_local(cfg, stop)
    except RanksFailedError as e:
        if interruption.signal is not None and e.killed_by in STOP_SIGNALS:  # before their handlers were set
            print(f"stopped by {interruption.name} while the ranks started, before any step to save")
            return STOPPED_STATUS
        print(f"launch: training failed: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # the one rank of this process failed
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"launch: training failed: {type(e).__name__}: {first_line}", file=sys.stderr)
        return 1
    if result.stopped:
        print(stopped_line(result.steps, cfg.checkpoint.run_dir, interruption.name or "a stop signal"))
        return STOPPED_STATUS
    print(f"done: {result.steps} steps in {cfg.checkpoint.run_dir}")
    return 0


def _quiet_after_a_hard_quit() -> contextlib.AbstractContextManager[None]:
    """A second Ctrl-C ends this process at once (os._exit), with the loader's queues and the ranks' still
    registered with multiprocessing's resource tracker (of this process, which the ranks share): the tracker
    removes them, as it should, and would then warn of leaked semaphores in two lines more. That warning is
    expected after a hard quit, so the tracker starts with it ignored: PYTHONWARNINGS, read by every
    interpreter this process starts while the launch runs (the tracker too: enter this before anything
    starts it)."""
    quiet = "ignore:resource_tracker:UserWarning"
    return scoped_environ(
        {"PYTHONWARNINGS": ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), quiet]))}
    )


def _end_children() -> None:
    """A second Ctrl-C: the ranks (or this rank's loader workers) end now."""
    for child in multiprocessing.active_children():
        child.kill()


def launch_local(cfg: RunConfig, stop: Event | None = None) -> TrainResult:
    """Train on this host until done, or until `stop` is set (every rank then saves the step under way and
    returns): the result of rank 0."""
    if cfg.nodes != 1:
        raise ValueError(f"launcher=local runs on this host only: nodes={cfg.nodes} must be 1")
    from svd.train.metrics import launch_multiprocess_dir

    stop = stop or multiprocessing.get_context("spawn").Event()
    owner = {RUN_OWNER: f"local-{uuid.uuid4().hex[:12]}"}  # this launch owns the run directory
    with scoped_environ(owner), launch_multiprocess_dir(cfg.metrics.port, cfg.job_name):
        return run(cfg, _polling(stop)) if cfg.gpus_per_node == 1 else _launch_ranks(cfg, stop)


class RanksFailedError(RuntimeError):
    """A rank of a multi-rank run failed; the message names the first one and its own error."""

    def __init__(self, message: str, killed_by: int | None) -> None:
        super().__init__(message)
        self.killed_by = killed_by  # the signal that ended the first failing rank, if one did


def _launch_ranks(cfg: RunConfig, stop: Event) -> TrainResult:
    """`gpus_per_node` ranks on this host, by torch's elastic agent (as torchrun)."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    port = cfg.launcher.master_port or free_port()
    threads = os.environ.get("OMP_NUM_THREADS") or "1"  # as torchrun: ranks share the host's cores
    reports = Path(tempfile.mkdtemp(prefix="svd-ranks-"))  # torch's error file of each rank
    launch = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=cfg.gpus_per_node,
        run_id=f"svd-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{port}",
        max_restarts=0,
        monitor_interval=0.2,
        start_method="spawn",
        signals_to_handle=AGENT_SIGNALS,
        logs_specs=DefaultLogsSpecs(log_dir=str(reports)),
    )
    try:
        with _quiet(ELASTIC_LOGGERS), scoped_environ({"OMP_NUM_THREADS": threads}):
            results = elastic_launch(launch, _rank_main)(to_yaml(cfg), stop)
    except ChildFailedError as e:
        exitcode = e.get_first_failure()[1].exitcode
        message = f"{first_failure(e, reports)} (each rank's error: {reports})"
        raise RanksFailedError(message, -exitcode if exitcode < 0 else None) from None
    shutil.rmtree(reports, ignore_errors=True)
    return results[0]


def first_failure(error: ChildFailedError, reports: Path) -> str:
    """The first failing rank and its own error, in one line. torch reports the failure it noticed first; the
    ranks that raised also wrote their error to a file in `reports`, and the earliest file names the cause
    (the others failed because that rank was gone). A rank without a file died of a signal or exited: that is
    the cause, since an error elsewhere does not kill a process."""
    noticed, failure = error.get_first_failure()
    raised = sorted(
        (path.stat().st_mtime_ns, int(path.parent.name), _error_message(path))
        for path in reports.glob("*/attempt_*/*/error.json")
    )
    failed = {rank for _, rank, _ in raised} | set(error.failures)
    more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
    if not raised or not Path(failure.error_file).is_file():
        if failure.exitcode < 0:
            return f"rank {noticed}{more}: killed by {failure.signal_name()}"
        return f"rank {noticed}{more}: exit status {failure.exitcode}"
    _, rank, message = raised[0]
    return f"rank {rank}{more}: {message}"


def _error_message(path: Path) -> str:
    """The first line of the exception torch recorded: "TypeName: message"."""
    message = json.loads(path.read_text())["message"]
    text = message["message"] if isinstance(message, dict) else message
    return text.strip().splitlines()[0] if text.strip() else ""


@contextmanager
def _quiet(names: tuple[str, ...]) -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
