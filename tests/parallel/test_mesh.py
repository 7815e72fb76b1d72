"""Sharded = single-device: training steps, gradient features and a RAISE episode on 8 virtual CPU
devices (data-parallel, FSDP, and data x fsdp x tensor meshes) give the one-device results.

The device count is fixed when JAX starts, so the sharded runs happen in a subprocess
(`mesh_worker.py`); it also runs the one-device reference, in the same process, so every run
sees the same inputs and compiled kernels.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).parent
MESHES = ("data=8", "fsdp=8", "data=2,fsdp=2,tensor=2")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    work = tmp_path_factory.mktemp("mesh")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(HERE / "mesh_worker.py"), str(work), *MESHES], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = json.loads((work / "info.json").read_text())
    assert info["devices"] == 8
    return {**np.load(work / "results.npz"), "shard_shapes": info["shard_shapes"], "compiles": info["compiles"]}


def _pairs(results, mesh, what):
    keys = [k for k in results if k == f"none/{what}" or k[len(f"none/{what}"):][:1] in ("/", "[", ".")
            and k.startswith(f"none/{what}")]
    assert keys, what
    return [(k, results[k], results[f"{mesh}{k[len('none'):]}"]) for k in keys]


def _rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12))


@pytest.mark.parametrize("mesh", MESHES)
def test_training_steps_match_one_device(results, mesh):
    for key, one, sharded in _pairs(results, mesh, "loss"):
        np.testing.assert_allclose(sharded, one, rtol=1e-5, err_msg=key)
    for key, one, sharded in _pairs(results, mesh, "train"):
        # After 3 Adam steps: Adam divides by sqrt(v), which magnifies reduction-order rounding
        # in entries whose gradients are near zero; 1e-3 of the leaf's scale is still far below
        # one step's change (lr 3e-3).
        assert one.shape == sharded.shape, key
        assert _rel(one, sharded) < 1e-3, (key, _rel(one, sharded))


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_training_compiles_its_step_once_per_shape(results, mesh):
    # The step's outputs come back in its inputs' shardings, so step 2 reuses step 1's program.
    assert results["compiles"][mesh] == results["compiles"]["none"] <= 2  # 2 length buckets


@pytest.mark.parametrize("mesh", MESHES)
def test_gradient_features_match_one_device(results, mesh):
    for key, one, sharded in _pairs(results, mesh, "features"):
        assert one.shape == (40, 64)
        np.testing.assert_allclose(sharded, one, rtol=1e-4, atol=1e-6 * np.abs(one).max(), err_msg=key)


@pytest.mark.parametrize("mesh", MESHES)
def test_raise_episode_matches_one_device(results, mesh):
    for key, one, sharded in _pairs(results, mesh, "episode/rollout"):
        if one.dtype.kind in "iu":  # picks and pool indices: the same batches, exactly
            np.testing.assert_array_equal(sharded, one, err_msg=key)
        else:
            np.testing.assert_allclose(sharded, one, rtol=1e-4, atol=1e-6, err_msg=key)
    for key, one, sharded in _pairs(results, mesh, "episode/trainable"):
        assert _rel(one, sharded) < 1e-3, (key, _rel(one, sharded))


@pytest.mark.parametrize("mesh", MESHES)
def test_checkpoint_loads_straight_into_its_sharding(results, mesh):
    for key, one, sharded in _pairs(results, mesh, "load"):
        np.testing.assert_array_equal(sharded, one, err_msg=key)  # the same bytes, read slice by slice
    full, shards = results["shard_shapes"]["none"], results["shard_shapes"][mesh]
    embed, kernel = "['embed_tokens']", "['layers'][0]['mlp']['up_proj']['kernel']"
    sizes = dict(part.split("=") for part in mesh.split(","))
    fsdp, tensor = int(sizes.get("fsdp", 1)), int(sizes.get("tensor", 1))
    # Each device holds 1/(fsdp x tensor) of a matrix whose dimensions divide; norms are whole.
    for name in (embed, kernel):
        assert np.prod(shards[name]) * fsdp * tensor == np.prod(full[name]), (name, shards[name], full[name])
    assert shards["['norm']['weight']"] == full["['norm']['weight']"]
