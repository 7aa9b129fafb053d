"""Real services for the tests, started once per session on 127.0.0.1."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import string
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

# What every launcher does before a rank starts, done before anything imports prometheus_client (which fixes
# its single- or multi-process mode at import): these tests run ranks in this process too, and test modules
# import prometheus_client when collected. Launches from here still give their ranks folders of their own.
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="svd-test-metrics-"))

import numpy as np
import pytest
import torch
from PIL import Image

from svd.data.local_s3 import LocalS3, create_bucket
from svd.data.storage import Storage, join
from svd.data.synthetic import synthetic_corpus
from svd.data.table import write_clip_table
from svd.environ import scoped_environ

from .settings import production_settings

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class ObjectStore:
    storage: Storage
    env: dict[str, str]

    def new_bucket(self) -> str:
        name = f"t-{uuid.uuid4().hex[:12]}"
        create_bucket(self.storage, name)
        return name

    def latest_step(self, run_dir: str) -> int | None:
        """The step of the run's latest checkpoint (its `latest` marker), None before the first."""
        fs, path = self.storage.fsspec(f"{run_dir}/checkpoints/latest")
        return json.loads(fs.cat_file(path))["step"] if fs.exists(path) else None

    def model_weights(self, run_dir: str) -> dict[str, torch.Tensor]:
        """The trained weights of the run's latest checkpoint."""
        from svd.train.checkpoint import read_full_state

        return read_full_state(run_dir, "model.model", self.storage)

    def assert_same_weights(self, run_dir: str, reference_dir: str, lr: float = 1e-4) -> None:
        """The two runs' latest weights are those of the same training, whatever world sizes trained them.
        Another world size sums gradients in another order, and Adam turns the rounding of a weight whose
        gradient is almost 0 into up to a step's update: measured 2 ranks → 1 against 1, 10 steps, 2M weights:
        mean difference 4e-10, 108 weights above 1e-6, the largest 1.1e-5. A step trained twice or not at all
        moves nearly every weight by about `lr` (Adam's first updates are ±lr): a mean of 1e-5 or more."""
        a, b = self.model_weights(reference_dir), self.model_weights(run_dir)
        assert a.keys() == b.keys()
        differences = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
        assert differences.mean().item() < 1e-8
        assert differences.max().item() < lr / 2


# The local stores answer slowly on this machine when it is loaded (radosgw took over 20 s to create a
# bucket at a load of 30 on 2 cores): the tests give them lenient deadlines. The defaults are meant for a
# production store; tests/faults checks that they fail a silent one within a minute.
LOCAL_STORE_DEADLINES = {"SVD_STORAGE_READ_TIMEOUT": "30", "SVD_STORAGE_MAX_ATTEMPTS": "3"}


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[ObjectStore]:
    """moto's S3 server: starts in ~1 s; for correctness tests."""
    with LocalS3() as server:
        env = server.env() | LOCAL_STORE_DEADLINES
        yield ObjectStore(Storage.from_env(env), env)


@pytest.fixture(scope="session")
def radosgw() -> ObjectStore:
    """Ceph's radosgw via infra/local/radosgw.sh: a real object store (conditional writes, fast ranged reads).
    Skipped on a machine that cannot install Ceph, except in CI, where that is a failure."""
    script = ROOT / "infra" / "local" / "radosgw.sh"
    done = subprocess.run([str(script), "start"], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        message = f"radosgw unavailable: {done.stderr.strip().splitlines()[-1:]}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    env = dict(line.removeprefix("export ").split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    env |= LOCAL_STORE_DEADLINES
    for key in ("AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_RESPONSE_CHECKSUM_VALIDATION"):
        os.environ[key] = env[key]  # read by the AWS SDKs from the environment only
    return ObjectStore(Storage.from_env(env), env)


@pytest.fixture(scope="session")
def avi_bytes() -> bytes:
    """2 s of a moving square, MPEG-4 Part 2 in AVI (a RIFF container, like WebP): written by PyAV."""
    import io

    import av

    from svd.data.synthetic import moving_square

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="avi") as container:
        stream = container.add_stream("mpeg4", rate=24)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for frame in moving_square(48, 48, 64, velocity=(0.0, 2.0)):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


@pytest.fixture
def s3_bucket(moto_s3: ObjectStore) -> str:
    """A fresh bucket on the moto server, as an s3:// prefix."""
    return f"s3://{moto_s3.new_bucket()}"


@pytest.fixture(scope="session")
def tiny_clip_factory(tmp_path_factory):
    """Saves small randomly initialised CLIPs in the Hugging Face layout (model, tokenizer, image processor),
    loaded by the same code as real weights: `factory(name, image_size=…, patch_size=…, projection_dim=…)`."""

    def save(name: str, *, image_size: int, patch_size: int, projection_dim: int) -> str:
        from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

        folder = tmp_path_factory.mktemp(name)
        chars = string.ascii_lowercase + string.digits
        tokens = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
        (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
        (folder / "merges.txt").write_text("#version: 0.2\n")
        small = {
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "projection_dim": projection_dim,
        }
        text = {
            "vocab_size": len(tokens),
            "max_position_embeddings": 77,
            "bos_token_id": 0,
            "eos_token_id": 1,
        }
        config = CLIPConfig(
            text_config=small | text | {"pad_token_id": 1},
            vision_config=small | {"image_size": image_size, "patch_size": patch_size},
            projection_dim=projection_dim,
        )
        torch.manual_seed(0)
        CLIPModel(config).save_pretrained(folder)
        crop = {"height": image_size, "width": image_size}
        image_processor = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=crop)
        tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
        CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
        return str(folder)

    return save


@pytest.fixture(scope="session")
def local_table(tmp_path_factory) -> str:
    """A clip table on local disk (2 videos, 4 clips, one in the val split): for runs whose object store
    is down or silent, and for ranks that need a table but no store."""
    folder = tmp_path_factory.mktemp("local_table")
    (folder / "raw").mkdir()
    rows = synthetic_corpus(str(folder / "raw"), Storage(), videos=2, seconds=3.0, clip_seconds=1.5)
    rows[0]["split"] = "val"
    write_clip_table(str(folder / "clips.lance"), rows, Storage())
    return str(folder / "clips.lance")


@pytest.fixture(scope="session")
def train_table(moto_s3) -> dict:
    """The training tests' clip table (`write_train_table`) on the moto server."""
    return write_train_table(moto_s3)


@pytest.fixture(scope="session")
def rgw_train_table(radosgw) -> dict:
    """The same table on radosgw, for runs that checkpoint to a real object store."""
    return write_train_table(radosgw)


def write_train_table(store: ObjectStore) -> dict:
    """12 clips of 6 videos (3 s at 8 fps, 32×48; camera_motion alternates static/zoom_in), 2 of them in
    the val split, and 4 still images, in a new bucket of `store`."""
    bucket = f"s3://{store.new_bucket()}"
    rows = synthetic_corpus(f"{bucket}/raw", store.storage, videos=6, seconds=3.0, clip_seconds=1.5)
    for i, row in enumerate(rows):
        row["camera_motion"] = ("static", "zoom_in")[i % 2]
    rows[0]["split"] = rows[5]["split"] = "val"
    rng = np.random.default_rng(0)
    for i in range(4):
        uri = join(bucket, "raw", f"image_{i}.png")
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        fs, path = store.storage.fsspec(uri)
        fs.pipe_file(path, buffer.getvalue())
        rows.append(
            rows[1]
            | {
                "clip_id": f"image_{i}",
                "video_uri": uri,
                "start_s": 0.0,
                "end_s": 0.0,
                "width": 32,
                "height": 32,
                "num_frames": 1,
                "captions": [f"image {i}"],
                "split": "train",
            }
        )
    table = f"{bucket}/clips.lance"
    with scoped_environ(store.env):  # a test's environment may name the other store (Storage.lance_options)
        write_clip_table(table, rows, store.storage)
    return {"table": table, "bucket": bucket, "rows": rows}


@pytest.fixture(scope="session")
def trained_run(train_table, moto_s3) -> str:
    """A text-to-video tiny run of 2 steps with a checkpoint at step 2, for the tests of the jobs that read a
    finished run (evaluation, locally and on every launcher): trained once per session."""
    from svd.config import compose
    from svd.launch.local import launch_local

    run_dir = f"{train_table['bucket']}/runs/eval-trained"
    settings = production_settings(train_table["table"], run_dir, "stage=video_pretrain", "train.steps=2")
    with pytest.MonkeyPatch.context() as patch:
        for key, value in moto_s3.env.items():
            patch.setenv(key, value)
        launch_local(compose([*settings, "train.global_batch=2", "checkpoint.every=2"]))
    return run_dir


@pytest.fixture
def s3_env(moto_s3, monkeypatch) -> dict[str, str]:
    """The S3 server in this process's environment (and so in every rank it starts)."""
    for key, value in moto_s3.env.items():
        monkeypatch.setenv(key, value)
    return moto_s3.env


# ---- training runs as a user or a scheduler starts them ----------------------------------------------------
STOPPED_LINE = re.compile(
    r"stopped by (\w+) after step (\d+), saved in (\S+); rerun the same command to continue$"
)
PROGRESS_LINE = re.compile(r"step (\d+)/\d+  loss (\d+\.\d+)")


class LaunchedRun:
    """`jobs/launch.py` in a session of its own, as a terminal, a scheduler or Ray's job supervisor starts it
    (its process group is what Ctrl-C, Slurm and `ray job stop` signal); its output lines as they come."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.args = args
        self.process = subprocess.Popen(
            [sys.executable, "-u", str(ROOT / "jobs" / "launch.py"), *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(self.process.stdout, self.stdout), daemon=True),
            threading.Thread(target=self._read, args=(self.process.stderr, self.stderr), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float = 900) -> re.Match:
        """The first line of its output that matches `pattern`, once there is one; fails if the run ends."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.stdout + self.stderr:
                if match := re.search(pattern, line):
                    return match
            assert self.process.poll() is None, f"ended before {pattern!r}:\n{self.output()}"
            assert time.monotonic() < deadline, f"no {pattern!r} within {timeout} s:\n{self.output()}"
            time.sleep(0.1)

    def signal(self, signum: int) -> None:
        """To its process group, as Slurm signals every process of a step and a terminal its foreground."""
        os.killpg(self.process.pid, signum)

    def finish(self, timeout: float = 900) -> int:
        """Its exit status, once it ended (killed, with all its session, after `timeout`)."""
        try:
            return self.process.wait(timeout=timeout)
        finally:
            self.kill()
            for reader in self._readers:
                reader.join(timeout=10)

    def kill(self) -> None:
        """Ends what is left of its session: the launcher, its ranks and their loader workers."""
        for pid in self.left_running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.process.poll() is None:
            self.process.wait()

    def left_running(self) -> list[int]:
        """The live processes of its session (the launcher's, its ranks', their loader workers')."""
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[3]) == self.process.pid and fields[0] != "Z":
                found.append(int(stat.parent.name))
        return found

    @property
    def run_dir(self) -> str:
        """Its `checkpoint.run_dir`."""
        return next(a.split("=", 1)[1] for a in self.args if a.startswith("checkpoint.run_dir="))

    def output(self) -> str:
        return "\n".join([*self.stdout, "-- stderr --", *self.stderr])[-8000:]

    def losses(self) -> dict[int, float]:
        """Rank 0's loss of each step, from its progress lines (train.log_every=1), wherever it ran; a step it
        trained twice (resumed from an older checkpoint than the last step it trained) fails."""
        steps = [(int(m[1]), float(m[2])) for line in self.stdout if (m := PROGRESS_LINE.search(line))]
        assert len({step for step, _ in steps}) == len(steps), f"steps trained twice: {steps}"
        return dict(steps)

    def stopped(self) -> tuple[str, int, str]:
        """(signal, step, run directory) of its last line, which says that a stop request ended it."""
        match = STOPPED_LINE.search(self.stdout[-1] if self.stdout else "")
        assert match, self.output()
        return match[1], int(match[2]), match[3]


@pytest.fixture
def launched() -> Iterator[Callable[[list[str], dict[str, str]], LaunchedRun]]:
    """Starts `jobs/launch.py` (a `LaunchedRun`); whatever is left of the runs is killed after the test."""
    runs: list[LaunchedRun] = []

    def start(args: list[str], env: dict[str, str]) -> LaunchedRun:
        runs.append(LaunchedRun(args, env))
        return runs[-1]

    yield start
    for run in runs:
        run.kill()


@pytest.fixture(scope="session")
def rgw_env(radosgw) -> dict[str, str]:
    """A run's environment: radosgw, this checkout, one thread per rank (2 cores shared by everything)."""
    return os.environ | radosgw.env | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="session")
def production() -> Callable[..., list[str]]:
    """`production(table, run, *extra)`: `production_settings` for the table of a `write_train_table` dict
    and a run directory named `run` in its bucket."""

    def settings(table: dict, run: str, *extra: str) -> list[str]:
        return production_settings(table["table"], f"{table['bucket']}/runs/{run}", *extra)

    return settings


@pytest.fixture(scope="session")
def never_stopped(rgw_train_table, rgw_env, production) -> Iterator[LaunchedRun]:
    """What the stop tests of every launcher compare with: 12 steps on one rank, never stopped, in the
    production configuration, started beside the first test that asks. One run for all of them: each run
    costs the suite its time."""
    run = LaunchedRun(
        production(rgw_train_table, "never-stopped", "gpus_per_node=1", "train.steps=12"), rgw_env
    )
    yield run
    run.kill()
