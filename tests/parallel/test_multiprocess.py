"""Multi-process runs: 2 processes x 4 virtual CPU devices, joined by `jax.distributed` over
localhost on a global (data=2, fsdp=4) mesh, fill one feature store and train into one run
directory; both equal what a single process on one device writes."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from parallel_setup import feature_setup, store_features, train_run, trained_params

from jraise.data.feature_store import FeatureStore
from jraise.model import load_model

HERE = Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _flat(tree) -> dict:
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """The work directory of one 2-process run of multiprocess_worker.py (store + training)."""
    tmp_path = tmp_path_factory.mktemp("multiprocess")
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, str(HERE / "multiprocess_worker.py"), str(port), "2", str(i),
                               str(tmp_path), "data=2,fsdp=4"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    return tmp_path


def test_two_processes_fill_the_same_store_as_one(two_process_run):
    tmp_path = two_process_run
    for i in range(2):
        done = json.loads((tmp_path / f"done-{i}.json").read_text())
        assert done == {"process_index": i, "process_count": 2, "local_devices": 4, "global_devices": 8,
                        "mesh": {"data": 2, "fsdp": 4, "tensor": 1}, "complete": True, "train_steps": 3,
                        "final_dir": str(tmp_path / "train" / "final")}

    reference = store_features(feature_setup(tmp_path / "single"), tmp_path / "single-store")
    multi = FeatureStore.open(tmp_path / "store")
    assert multi.identity == reference.identity and multi.n == reference.n == 40
    a = reference.matrix().rows(0, reference.n).astype(np.float32)
    b = multi.matrix().rows(0, multi.n).astype(np.float32)
    np.testing.assert_allclose(b, a, atol=2e-3)  # float16 rows: one rounding step apart at most
    cosine = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert float(cosine.min()) > 0.99999


def test_two_processes_train_into_one_run_directory(two_process_run):
    """Process 0 alone writes the metrics log and the export; the result equals one process's run."""
    tmp_path = two_process_run
    lines = (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]  # one record per step, not one per process
    final = tmp_path / "train" / "final"
    assert (final / "config.json").is_file() and (final / "tokenizer_config.json").is_file()
    assert not list(final.glob(".*tmp*"))
    single = train_run(feature_setup(tmp_path / "single-train-data"), tmp_path / "single-train")
    reference = [json.loads(line) for line in (tmp_path / "single-train" / "metrics.jsonl").read_text().splitlines()]
    for got, want in zip(lines, reference):
        assert json.loads(got)["loss"] == pytest.approx(want["loss"], rel=1e-5)
    loaded, _ = load_model(final)
    for key, want in _flat(trained_params(single.model)).items():
        got = _flat(trained_params(loaded))[key]
        np.testing.assert_allclose(got, want, atol=1e-3 * (float(np.abs(want).max()) + 1e-6))
