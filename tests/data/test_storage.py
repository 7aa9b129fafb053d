import os
import subprocess
import sys
import time
from pathlib import Path

import lance
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from svd.data.loader import open_table
from svd.data.storage import Storage, join, scheme

ROOT = Path(__file__).resolve().parents[2]
ENV = {
    "AWS_ACCESS_KEY_ID": "AKIA-TEST",
    "AWS_SECRET_ACCESS_KEY": "very-secret-value",
    "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9",
    "AWS_DEFAULT_REGION": "eu-west-1",
}


def test_storage_comes_from_the_standard_aws_variables():
    storage = Storage.from_env(ENV)
    assert storage.endpoint_url == "http://127.0.0.1:9"
    assert storage.region == "eu-west-1"
    assert storage.lance_options("s3://b/t.lance") == {
        "aws_region": "eu-west-1",
        "aws_access_key_id": "AKIA-TEST",
        "aws_secret_access_key": "very-secret-value",
        "aws_endpoint": "http://127.0.0.1:9",
        "allow_http": "true",
        "connect_timeout": "3000ms",
        "timeout": "5000ms",
        "client_max_retries": "1",
        "client_retry_timeout": "5",
    }
    assert storage.lance_options("/local/t.lance") == {}


def test_deadlines_come_from_the_environment_and_reach_every_client():
    env = ENV | {
        "SVD_STORAGE_CONNECT_TIMEOUT": "0.5",
        "SVD_STORAGE_READ_TIMEOUT": "2",
        "SVD_STORAGE_MAX_ATTEMPTS": "4",
    }
    storage = Storage.from_env(env)
    assert (storage.connect_timeout, storage.read_timeout, storage.max_attempts) == (0.5, 2.0, 4)
    options = storage.lance_options("s3://b/t.lance")
    assert (options["connect_timeout"], options["timeout"], options["client_max_retries"]) == (
        "500ms",
        "2000ms",
        "3",
    )
    assert options["client_retry_timeout"] == "2"  # object_store does not try again after a timeout
    fs, _ = storage.fsspec("s3://b/k")
    assert fs.retries == 2  # s3fs's loop around botocore's: once more when an answer broke off
    config = fs.config_kwargs
    assert (config["connect_timeout"], config["read_timeout"], config["retries"]["total_max_attempts"]) == (
        0.5,
        2.0,
        4,
    )
    assert storage.fsspec("s3://b/other")[0] is fs  # one client (and connection pool) for equal settings
    with pytest.raises(ValueError, match="SVD_STORAGE_MAX_ATTEMPTS='many'"):
        Storage.from_env(ENV | {"SVD_STORAGE_MAX_ATTEMPTS": "many"})
    with pytest.raises(ValueError, match="max_attempts=0"):
        Storage(max_attempts=0)


def test_only_an_error_that_ran_out_of_time_names_the_deadlines_to_raise():
    storage = Storage.from_env(ENV | {"SVD_STORAGE_READ_TIMEOUT": "2"})
    hint = (
        " (no answer in time: SVD_STORAGE_READ_TIMEOUT=2 s, SVD_STORAGE_CONNECT_TIMEOUT=3 s, "
        "SVD_STORAGE_MAX_ATTEMPTS=2; raise them for a slow store)"
    )
    lance_timeout = (
        "Error performing GET http://127.0.0.1:9/b?list-type=2 in 2.000902685s - HTTP error: error"
    )
    lance_refused = (
        "Error performing GET http://127.0.0.1:9/b?list-type=2 in 0.001302685s - HTTP error: error"
    )
    curl = "AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 28, Timeout was reached"
    try:
        raise OSError("the client gave up") from TimeoutError()
    except OSError as e:
        chained = e
    for error in (
        TimeoutError(),
        OSError(110, "Connection timed out"),
        ValueError(lance_timeout),
        OSError(curl),
    ):
        assert storage.timeout_hint(error) == hint
    assert storage.timeout_hint(chained) == hint
    for error in (ValueError(lance_refused), PermissionError("Access Denied"), FileNotFoundError("b/k")):
        assert storage.timeout_hint(error) == ""


def test_credentials_never_appear_in_the_repr():
    text = repr(Storage.from_env(ENV)) + str(Storage.from_env(ENV))
    assert "very-secret-value" not in text
    assert "AKIA-TEST" not in text


def test_uri_helpers():
    assert scheme("s3://b/k") == "s3"
    assert scheme("/tmp/x") == "file"
    assert join("s3://b/", "/raw/", "a.mp4") == "s3://b/raw/a.mp4"


def test_fsspec_ranged_reads_on_a_real_s3_server(moto_s3, s3_bucket):
    fs, path = moto_s3.storage.fsspec(f"{s3_bucket}/blob.bin")
    payload = bytes(range(256)) * 4096
    fs.pipe_file(path, payload)
    with fs.open(path, "rb", block_size=4096) as f:
        f.seek(300_000)
        assert f.read(10) == payload[300_000:300_010]


def test_fsspec_pyarrow_and_lance_see_the_same_objects(moto_s3, s3_bucket):
    table = pa.table({"x": [1, 2, 3]})
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    fs, path = moto_s3.storage.fsspec(f"{s3_bucket}/t.parquet")
    fs.pipe_file(path, buffer.getvalue().to_pybytes())
    # (pyarrow's own multipart upload fails against moto; it is exercised on radosgw below)
    pa_fs, pa_path = moto_s3.storage.pyarrow(f"{s3_bucket}/t.parquet")
    assert pq.read_table(pa_path, filesystem=pa_fs).equals(table)
    uri = f"{s3_bucket}/t.lance"
    lance.write_dataset(table, uri, storage_options=moto_s3.storage.lance_options(uri))
    assert lance.dataset(uri, storage_options=moto_s3.storage.lance_options(uri)).count_rows() == 3


def test_lance_is_not_handed_a_store_that_the_environment_overrides(moto_s3, s3_bucket, monkeypatch):
    """Lance takes AWS_ENDPOINT_URL_S3 over the endpoint it is given: with another store in the environment it
    read and wrote that store (a test's moto while the table was meant for radosgw: NoSuchBucket)."""
    uri = f"{s3_bucket}/t.lance"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_s3.storage.endpoint_url + "/")  # the same store, spelt so
    assert moto_s3.storage.lance_options(uri)["aws_endpoint"] == moto_s3.storage.endpoint_url
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:1")
    with pytest.raises(ValueError, match="AWS_ENDPOINT_URL_S3") as refused:
        moto_s3.storage.lance_options(uri)
    assert str(refused.value) == (
        f"{uri}: its store is {moto_s3.storage.endpoint_url}, but AWS_ENDPOINT_URL_S3=http://127.0.0.1:1 in "
        "this process's environment, which Lance would use instead: unset it or point it at the same store"
    )
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    assert moto_s3.storage.lance_options(uri)["aws_endpoint"] == moto_s3.storage.endpoint_url


def test_pyarrow_writes_and_reads_on_radosgw(radosgw):
    bucket = radosgw.new_bucket()
    table = pa.table({"x": list(range(1000))})
    pa_fs, path = radosgw.storage.pyarrow(f"s3://{bucket}/t.parquet")
    pq.write_table(table, path, filesystem=pa_fs)
    assert pq.read_table(path, filesystem=pa_fs).equals(table)


def test_a_missing_table_is_named_without_credentials(moto_s3, s3_bucket):
    storage = Storage.from_env(moto_s3.env)
    with pytest.raises(FileNotFoundError, match=r"nothing\.lance") as raised:
        open_table(f"{s3_bucket}/nothing.lance", storage)
    assert storage.secret_key not in str(raised.value)


COPY_AT = """
import sys, time
from svd.data.storage import Storage
start, uri, cache = float(sys.argv[1]), sys.argv[2], sys.argv[3]
time.sleep(max(0.0, start - time.time()))
print(Storage.from_env().local_copy(uri, cache))
"""


@pytest.mark.slow
def test_a_cold_cache_gives_many_processes_one_complete_copy(moto_s3, s3_bucket, tmp_path):
    """Four processes on one node ask for the same model folder at the same moment."""
    fs, path = moto_s3.storage.fsspec(f"{s3_bucket}/models/clip")
    for i in range(6):
        fs.pipe_file(f"{path}/part{i}.bin", bytes([i]) * 300_000)
    start = time.time() + 3  # after every interpreter has started
    argv = [sys.executable, "-c", COPY_AT, str(start), f"{s3_bucket}/models/clip", str(tmp_path)]
    env = os.environ | moto_s3.env | {"PYTHONPATH": str(ROOT)}
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    processes = [subprocess.Popen(argv, env=env, **pipes) for _ in range(4)]
    results = [p.communicate(timeout=120) for p in processes]
    assert [p.returncode for p in processes] == [0] * 4, [err.decode()[-500:] for _, err in results]
    copies = {out.decode().strip() for out, _ in results}
    assert len(copies) == 1
    copy = Path(copies.pop())
    assert sorted(p.name for p in copy.iterdir()) == [f"part{i}.bin" for i in range(6)]
    assert all((copy / f"part{i}.bin").read_bytes() == bytes([i]) * 300_000 for i in range(6))
    assert [p.name for p in copy.parent.iterdir()] == ["clip"]  # no temporary copy left behind
