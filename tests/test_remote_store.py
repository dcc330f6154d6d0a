"""Feature caches at an fsspec URL: extract / cache-info / train-head / evaluate on a local S3 server.

moto's ThreadedMotoServer (``moto[server]``, in the ``test`` extra) serves S3 on loopback; s3fs
(the ``s3`` extra) is the filesystem zarr's FsspecStore writes through. The endpoint reaches the
CLI the way a user would set it: ``FSSPEC_S3_ENDPOINT_URL`` (fsspec's per-protocol config).
"""

import json
import os

import pytest
import torch

from pipeline.cache import CacheError, FeatureCache

from .conftest import COCO_ROOT, SMALL_EXTRACT, head_sets, records_equal, require_coco, run_cli


def _require(module):
    try:
        __import__(module)
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail(f"{module} missing: install the test extra (pip install -e '.[test]')", pytrace=False)
        pytest.skip(f"{module} not installed (extra [s3] / [test])")


@pytest.fixture(scope="module")
def s3_env():
    _require("s3fs")
    _require("moto.server")
    import fsspec
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "FSSPEC_S3_ENDPOINT_URL": f"http://{host}:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    old_conf = fsspec.config.conf.get("s3")
    fsspec.config.conf["s3"] = {"endpoint_url": env["FSSPEC_S3_ENDPOINT_URL"]}  # this process too
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir("caches")
    yield env
    fsspec.config.conf.pop("s3") if old_conf is None else fsspec.config.conf.update(s3=old_conf)
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.update({k: v})
    server.stop()


def test_s3_store_extract_resume_info_train_evaluate(tmp_path, s3_env):
    """A store at s3://... equals the local one image by image, resumes by done flags, and
    cache-info and train-head (one spawned loader worker; --val-cache evaluated by URL) read it."""
    require_coco()
    url = "s3://caches/val.zarr"
    common = [*SMALL_EXTRACT, "--coco-root", COCO_ROOT, "--split", "val2017", "--max-images", 3]
    res = run_cli("extract", *common, "--out", url, env=s3_env)
    assert json.loads(res.stdout[res.stdout.index("{"):])["done"] == 3
    assert "not locked" in res.stderr  # says what an object store cannot do
    run_cli("extract", *common, "--out", tmp_path / "local.zarr")
    remote, local = FeatureCache.open(url), FeatureCache.open(tmp_path / "local.zarr")
    assert remote.path == url and remote.done_indices() == [0, 1, 2]
    for i in range(3):
        assert records_equal(remote.read(i, [4, 6]), local.read(i, [4, 6]))
    again = run_cli("extract", *common, "--out", url, env=s3_env)  # resume: nothing left to do
    assert json.loads(again.stdout[again.stdout.index("{"):])["extracted_now"] == 0
    info = json.loads(run_cli("cache-info", url, "--json", env=s3_env).stdout)
    assert info["done"] == 3 and info["path"] == url and info["disk_bytes"] > 0
    out = tmp_path / "run"
    run_cli("train-head", "--cache", url, "--val-cache", url, "--max-iters", 2, "--batch-size", 2, "--boxes", "gt",
            "--device", "cpu", "--quiet", "--num-workers", 1, *head_sets(), "--out", out, env=s3_env)
    assert (out / "head.pt").exists()
    assert "segm" in json.loads((out / "eval" / "metrics.json").read_text())  # evaluated from the URL too


def test_unknown_or_missing_filesystem_is_a_clear_error(tmp_path):
    with pytest.raises(CacheError, match="not a store URL fsspec knows"):
        FeatureCache.open("nosuchfs://bucket/x.zarr")
    res = run_cli("cache-info", "nosuchfs://bucket/x.zarr", check=False)
    assert res.returncode != 0 and "nosuchfs://bucket/x.zarr" in res.stderr + res.stdout
    assert "Traceback" not in res.stderr
