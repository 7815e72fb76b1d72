"""jraise.parallel's pure parts (mesh specs, sharding rules, multi-host settings) and `jraise --mesh`
end to end (a subprocess with 2 virtual devices: the sharded CLI run equals the plain one)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from parallel_setup import trained_params

from jraise import parallel
from jraise.parallel import AXES, MeshSpec, distributed_settings, param_spec


@pytest.mark.parametrize("text, n, sizes", [
    ("auto", 8, (8, 1, 1)), ("", 4, (4, 1, 1)), ("data=8", 8, (8, 1, 1)), ("fsdp=8", 8, (1, 8, 1)),
    ("fsdp=-1", 8, (1, 8, 1)), ("data=2,fsdp=4", 8, (2, 4, 1)), ("fsdp=2,tensor=2", 8, (2, 2, 2)),
    ("data=2, fsdp=2, tensor=2", 8, (2, 2, 2)), ("tensor=4,data=-1", 8, (2, 1, 4)),
])
def test_mesh_spec_resolves_to_the_device_count(text, n, sizes):
    assert MeshSpec.parse(text).resolve(n) == sizes


@pytest.mark.parametrize("text, n, message", [
    ("data=3", 8, "needs 3 devices, 8 are available"), ("pipeline=2", 8, "AXIS=SIZE"),
    ("data=2,data=4", 8, "given twice"), ("fsdp=-1,data=-1", 8, "at most one"), ("fsdp=3,data=-1", 8, "multiple"),
    ("data=0", 8, ">= 1"), ("data", 8, "AXIS=SIZE"),
])
def test_bad_mesh_specs_are_errors_that_say_why(text, n, message):
    with pytest.raises(ValueError, match=message):
        MeshSpec.parse(text).resolve(n)


def test_make_mesh_on_this_process_devices():
    mesh = parallel.make_mesh("auto")
    assert mesh.axis_names == AXES and mesh.devices.size == len(mesh.devices.flat) >= 1
    with parallel.use_mesh(mesh):
        assert parallel.active_mesh() is mesh and parallel.row_shards() == mesh.devices.size
    assert parallel.active_mesh() is None and parallel.row_shards() == 1


@pytest.mark.parametrize("sizes, shape, spec", [
    ((1, 4, 1), (64, 32), PartitionSpec("fsdp")),             # FSDP: the largest divisible dimension
    ((1, 4, 1), (30, 32), PartitionSpec(None, "fsdp")),       # 30 does not divide: the other one
    ((1, 4, 1), (30, 6), PartitionSpec()),                    # nothing divides: replicated
    ((1, 4, 1), (64,), PartitionSpec()),                      # vectors (norms, biases): replicated
    ((1, 1, 2), (64, 32), PartitionSpec(None, "tensor")),     # tensor: the output dimension
    ((1, 2, 2), (64, 32), PartitionSpec("fsdp", "tensor")),
    ((1, 2, 2), (64, 31), PartitionSpec("fsdp")),             # output not divisible: FSDP only
    ((8, 1, 1), (64, 32), PartitionSpec()),                   # pure data parallel: weights replicated
    ((1, 4, 1), (2, 8, 8), PartitionSpec(None, "fsdp")),      # ties: the first largest dimension
])
def test_param_spec_rules(sizes, shape, spec):
    assert param_spec(shape, AbstractMesh(sizes, AXES)) == spec


def test_distributed_settings_from_flags_and_environment(monkeypatch):
    for name in (*parallel.ENV_COORDINATOR, *parallel.ENV_NUM_PROCESSES, *parallel.ENV_PROCESS_ID):
        monkeypatch.delenv(name, raising=False)
    assert distributed_settings() is None  # nothing asks for multi-process: a plain run
    assert distributed_settings("h:1234", 2, 1) == {"coordinator_address": "h:1234", "num_processes": 2,
                                                     "process_id": 1}
    monkeypatch.setenv("JRAISE_COORDINATOR", "10.0.0.1:9999")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    with pytest.raises(ValueError, match="process_id not given"):
        distributed_settings()
    monkeypatch.setenv("JRAISE_PROCESS_ID", "3")
    assert distributed_settings() == {"coordinator_address": "10.0.0.1:9999", "num_processes": 4, "process_id": 3}
    with pytest.raises(ValueError, match="outside 0..3"):
        distributed_settings(process_id=4)


def _cli(*args, devices=2):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
           "COLUMNS": "300"}  # error boxes on one line
    return subprocess.run([sys.executable, "-m", "jraise.cli", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=600)


def test_cli_mesh_option_trains_the_same_model(tmp_path, testbed, make_model_dir):
    from jraise.model import load_model

    model = make_model_dir(testbed["tokenizer"], seed=0, num_hidden_layers=1)  # as parallel_setup: one layer
    common = ["--model", model, "--data", testbed["pool"], "--batch-size", 8, "--max-steps", 2, "--lr", 1e-3,
              "--max-len", 128]
    plain = _cli("train", *common, "--out", tmp_path / "plain")
    sharded = _cli("--mesh", "fsdp=2", "train", *common, "--out", tmp_path / "sharded")
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert json.loads(sharded.stdout)["steps"] == 2
    a, _ = load_model(tmp_path / "plain" / "final")
    b, _ = load_model(tmp_path / "sharded" / "final")
    pairs = zip(jax.tree_util.tree_leaves_with_path(trained_params(a)), jax.tree.leaves(trained_params(b)), strict=True)
    for (path, x), y in pairs:
        np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    bad = _cli("--mesh", "data=3", "train", *common, "--out", tmp_path / "bad")
    assert bad.returncode == 2 and "needs 3 devices, 2 are available" in bad.stderr
