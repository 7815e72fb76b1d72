"""A training loss that turns NaN or infinite stops the run: nothing of that step is written, the
last good checkpoint stays, and the CLI says so (exit 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

from jraise.data.pool import load_pool
from jraise.model import init_model, load_tokenizer
from jraise.train import TrainConfig, checkpoint_steps, train
from jraise.train import loop
from jraise.train.loop import TrainingDiverged


@pytest.fixture(scope="module")
def setup(make_testbed, make_model_dir, tiny_config):
    """The testbed, a tiny model directory of seed 0 (both the suite's shared ones: read-only), its
    config and the pool."""
    paths = make_testbed(n_train=32, n_val_per_category=1, n_test_per_category=1, categories=["first", "add"])
    tok = load_tokenizer(paths["tokenizer"])
    return {"model": make_model_dir(paths["tokenizer"], seed=0), "paths": paths, "config": tiny_config(tok),
            "pool": load_pool(paths["pool"], tok, max_len=128)}


def _metrics_steps(run_dir):
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("field", ["loss", "grad_norm"])
def test_a_non_finite_step_stops_the_run_and_keeps_the_last_checkpoint(setup, tmp_path, monkeypatch, field):
    real = loop.step_functions

    def poisoned(graphdef, opt_args, dtypes):  # step 4 reports a non-finite value
        tx, step_fn, eval_fn = real(graphdef, opt_args, dtypes)
        calls = []

        def step(*args):
            trainable, opt_state, metrics = step_fn(*args)
            calls.append(1)
            if len(calls) == 4:
                metrics = {**metrics, field: jnp.asarray(jnp.inf if field == "grad_norm" else jnp.nan)}
            return trainable, opt_state, metrics

        return tx, step, eval_fn

    monkeypatch.setattr(loop, "step_functions", poisoned)
    config = TrainConfig(lr=1e-3, schedule="constant", batch_size=4, max_steps=6, save_every=2)
    with pytest.raises(TrainingDiverged) as err:
        train(init_model(setup["config"], seed=0), setup["pool"], config, tmp_path / "run",
              tokenizer_dir=setup["paths"]["tokenizer"])
    assert (err.value.step, err.value.checkpoint) == (4, 2)
    message = str(err.value)
    assert "step 4" in message and "checkpoints/2" in message and ("nan" in message or "inf" in message)
    assert _metrics_steps(tmp_path / "run") == [1, 2, 3]  # nothing of step 4 as if it were fine
    assert checkpoint_steps(tmp_path / "run") == [2]
    assert not (tmp_path / "run" / "final").exists()
    assert not (tmp_path / "run" / ".jraise.lock").exists()  # the lock goes with the exception


def test_the_cli_exits_2_naming_the_step_and_the_checkpoint_kept(setup, tmp_path):
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "JRAISE_DEBUG"}
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run([sys.executable, "-m", "jraise.cli", "train", "--model", str(setup["model"]),
                           "--data", str(setup["paths"]["pool"]), "--out", str(run), "--lr", "1e30",
                           "--schedule", "constant", "--warmup-ratio", "0", "--max-steps", "4", "--save-every", "1", "--batch-size", "4",
                           "--max-len", "128"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert 1 <= len(lines) <= 5 and "Traceback" not in proc.stderr
    assert "training diverged at step 2" in proc.stderr and str(run / "checkpoints" / "1") in proc.stderr
    assert _metrics_steps(run) == [1] and checkpoint_steps(run) == [1]
    assert not (run / "final").exists()
