"""`watch=true`: evaluate each checkpoint of a run as it lands, oldest first, beside the training (a
second Slurm job or RayJob), so evaluation never slows training. Results go where a single evaluation puts
them, and each metric is a Prometheus gauge `svd_eval_metric{job, stage, protocol, metric, step}` (the run's
job name and stage, as its training series have them) on this process's endpoint (the training's port range:
the next free port), for the dashboard's evaluation panel. Prometheus finds the endpoint as it finds
training's: announced to file_sd under Slurm (svd/launch/evaluation.py), by the PodMonitor on Kubernetes.

It ends once the run's last step is evaluated, or on SIGTERM/SIGINT after the shard under way (the next
watch finishes what is left). A checkpoint that `checkpoint.keep` pruned before its turn is named and skipped.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from svd.eval.job import Evaluation
from svd.train.metrics import MetricsServer, serve_metrics
from svd.train.stop import StopRequest
from svd.train.trained import RunError, committed_steps


class EvalGauges:
    """The gauge of every metric and step evaluated, in a registry of its own."""

    def __init__(self, job: str, stage: str):
        from prometheus_client import CollectorRegistry, Gauge

        self.registry = CollectorRegistry()
        self.job, self.stage = job, stage
        self.gauge = Gauge(
            "svd_eval_metric",
            "An evaluation metric of a checkpoint (FVD, Spearman rho, PSNR, SSIM, CLIP similarity), by "
            "protocol and step",
            ("job", "stage", "protocol", "metric", "step"),
            registry=self.registry,
        )

    def observe(self, metrics: dict[str, Any]) -> None:
        for name, value in metrics["values"].items():
            if isinstance(value, float):
                step = str(metrics["step"])
                self.gauge.labels(self.job, self.stage, metrics["protocol"], name, step).set(value)


def watch(
    evaluation: Evaluation,
    *,
    poll_s: float,
    metrics_port: int,
    stop: StopRequest | None = None,
    say: Callable[[str], None] = print,
) -> list[int]:
    """The steps this process merged, in order. Polls the run's checkpoints every `poll_s` seconds."""
    stop = stop or StopRequest()
    gauges = EvalGauges(evaluation.run_config.job_name, evaluation.run_config.stage.name)
    server: MetricsServer | None = (
        serve_metrics(metrics_port, gauges.registry, what="evaluation") if metrics_port else None
    )
    merged: list[int] = []
    observed: set[int] = set()
    final = evaluation.run_config.steps
    try:
        # Signal handlers are the main thread's; a watch in another thread stops by `stop` alone
        in_main_thread = threading.current_thread() is threading.main_thread()
        with stop.on_signals([signal.SIGTERM, signal.SIGINT] if in_main_thread else []):
            while not stop.is_set():
                saved = committed_steps(evaluation.settings.run, evaluation.storage)
                for step in [s for s in saved if not evaluation.done(s)]:
                    if stop.is_set():
                        break
                    try:
                        metrics = evaluation.evaluate(step, progress=False, stop=stop)
                    except RunError as e:  # pruned (checkpoint.keep) before or while it was read
                        say(f"watch: step {step} skipped: {e}")
                        evaluation.skip(step)
                        continue
                    if metrics is not None:
                        merged.append(step)
                        say(summary(metrics))
                # Every evaluated step, whichever process merged it (or an earlier watch): each process of
                # a watch serves every gauge, so the one endpoint a pod's PodMonitor scrapes has them all
                for step in [s for s in saved if s not in observed and evaluation.evaluated(s)]:
                    gauges.observe(evaluation.metrics(step))
                    observed.add(step)
                if evaluation.done(final):
                    say(f"watch: the run's last step {final} is evaluated")
                    break
                _sleep(poll_s, stop)
    finally:
        if server is not None:
            server.close()
    return merged


def summary(metrics: dict[str, Any]) -> str:
    values = ", ".join(f"{k} {v:.4g}" for k, v in metrics["values"].items() if isinstance(v, float))
    return f"{metrics['protocol']} at step {metrics['step']}: {values} ({metrics['samples']} samples)"


def _sleep(seconds: float, stop: StopRequest) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not stop.is_set():
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
