"""The local Slurm cluster the launcher tests run on: two nodes, accounting, requeue, submitit."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest
import submitit


def sbatch(*args: str) -> str:
    return subprocess.run(
        ["sbatch", "--parsable", *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_a_two_node_job_runs_a_task_on_each_node_and_accounting_reports_it_completed(slurm_cluster, tmp_path):
    out = tmp_path / "out.txt"
    job_id = sbatch(
        "--nodes=2",
        "--ntasks-per-node=1",
        f"--partition={slurm_cluster.partition}",
        f"--output={out}",
        "--wrap",
        "srun bash -c 'echo $SLURM_PROCID $SLURMD_NODENAME'",
    )

    assert slurm_cluster.wait_until_finished(job_id) == "COMPLETED"
    assert sorted(out.read_text().split("\n")[:-1]) == ["0 n1", "1 n2"]


def test_a_submitit_job_of_two_nodes_gets_a_rank_and_a_node_name_per_task(slurm_cluster, tmp_path):
    def where() -> tuple[int, str, str]:
        env = submitit.JobEnvironment()
        return env.global_rank, env.hostnames[env.node], os.environ["SLURMD_NODENAME"]

    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    executor.update_parameters(
        nodes=2, tasks_per_node=1, timeout_min=5, slurm_partition=slurm_cluster.partition
    )
    job = executor.submit(where)

    assert job.results() == [(0, "n1", "n1"), (1, "n2", "n2")]
    # The results exist once both tasks have written them, a moment before Slurm sees the job end.
    assert slurm_cluster.wait_until_finished(job.job_id) == "COMPLETED"


def test_a_requeued_running_job_runs_again_with_its_restart_count_raised(slurm_cluster, tmp_path):
    runs = tmp_path / "runs.txt"
    # The first run records itself and waits to be requeued; the second records itself and ends.
    job_id = sbatch(
        f"--output={tmp_path / 'out.txt'}",
        "--wrap",
        f'echo "${{SLURM_RESTART_COUNT:-0}}" >> {runs}; [ "${{SLURM_RESTART_COUNT:-0}}" -ge 1 ] || sleep 120',
    )
    deadline = time.monotonic() + 60
    while not runs.exists():
        assert time.monotonic() < deadline, f"job {job_id} never started"
        time.sleep(0.1)

    subprocess.run(["scontrol", "requeue", job_id], check=True)

    assert slurm_cluster.wait_until_finished(job_id) == "COMPLETED"
    assert runs.read_text().split() == ["0", "1"]


@pytest.mark.slow
def test_start_waits_out_a_daemon_that_rewrites_its_pid_file_while_it_starts(
    slurm_installed, local_slurm, tmp_path
):
    # munged deletes and rewrites its pid file between creating its socket and answering on it; on a loaded
    # machine `start` once read that moment as "munged exited". This munged makes the moment 2 s long.
    munged = shutil.which("munged", path=os.environ["PATH"] + ":/usr/sbin:/sbin")
    shim = tmp_path / "bin" / "munged"
    shim.parent.mkdir()
    shim.write_text(
        "#!/bin/bash\n"
        'for arg; do [[ $arg == --pid-file=* ]] && rm -f "${arg#--pid-file=}"; done\n'
        "sleep 2\n"
        f'exec {munged} "$@"\n'
    )
    shim.chmod(0o755)
    cluster = local_slurm(tmp_path / "state", os.environ | {"PATH": f"{shim.parent}:{os.environ['PATH']}"})

    started = cluster.start()

    assert started.returncode == 0, started.stderr
    assert "Slurm cluster 'svd' ready" in started.stderr
