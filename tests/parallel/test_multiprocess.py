"""Multi-process feature extraction: 2 processes x 4 virtual CPU devices, joined by
`jax.distributed` over localhost, fill one feature store on a global (data=2, fsdp=4) mesh; the
store equals the one a single process on one device writes."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from parallel_setup import feature_setup, store_features

from jraise.grads.store import FeatureStore

HERE = Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_fill_the_same_store_as_one(tmp_path):
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
    for i in range(2):
        done = json.loads((tmp_path / f"done-{i}.json").read_text())
        assert done == {"process_index": i, "process_count": 2, "local_devices": 4, "global_devices": 8,
                        "mesh": {"data": 2, "fsdp": 4, "tensor": 1}, "complete": True}

    reference = store_features(feature_setup(tmp_path / "single"), tmp_path / "single-store")
    multi = FeatureStore.open(tmp_path / "store")
    assert multi.identity == reference.identity and multi.n == reference.n == 40
    a = reference.matrix().rows(0, reference.n).astype(np.float32)
    b = multi.matrix().rows(0, multi.n).astype(np.float32)
    np.testing.assert_allclose(b, a, atol=2e-3)  # float16 rows: one rounding step apart at most
    cosine = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert float(cosine.min()) > 0.99999
