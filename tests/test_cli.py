"""The `jraise` command line, run as a user would (a subprocess)."""

import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
from typer.testing import CliRunner

from jraise.cli import app

from jraise.model import load_model, load_tokenizer


def _jraise(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "jraise.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def test_testbed_then_init_model_writes_a_loadable_hf_directory(tmp_path):
    run = _jraise("testbed", tmp_path / "tb", "--n-train", 40, "--n-test", 2, "--n-val", 2)
    assert run.returncode == 0, run.stderr
    paths = json.loads(run.stdout)
    assert {"pool", "val", "val_pref", "test", "tokenizer"} <= set(paths)
    run = _jraise("init-model", tmp_path / "m", "--preset", "tiny", "--tokenizer", paths["tokenizer"],
                  "--seed", 3, "--model-type", "qwen2", "--tie-embeddings")
    assert run.returncode == 0, run.stderr
    model, config = load_model(tmp_path / "m")
    tok = load_tokenizer(tmp_path / "m")
    assert config.model_type == "qwen2" and config.tie_word_embeddings and config.attention_bias
    assert config.vocab_size == len(tok) and config.eos_token_id == tok.eos_token_id
    ids = jnp.asarray([tok("abc", add_special_tokens=False).input_ids])
    assert np.isfinite(np.asarray(model(ids))).all()
    # Same seed, same weights; another seed, other weights (in-process: no interpreter start-up).
    for name, seed in (("m2", 3), ("m3", 4)):
        result = CliRunner().invoke(app, ["init-model", str(tmp_path / name), "--tokenizer", paths["tokenizer"],
                                          "--seed", str(seed), "--model-type", "qwen2", "--tie-embeddings"])
        assert result.exit_code == 0, result.output
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == (tmp_path / "m2" / "model.safetensors").read_bytes()
    assert (tmp_path / "m" / "model.safetensors").read_bytes() != (tmp_path / "m3" / "model.safetensors").read_bytes()


def test_init_model_with_a_bad_preset_fails_clearly(tmp_path):
    from jraise.model import build_char_tokenizer

    build_char_tokenizer(tmp_path / "tok", ["ab"])
    result = CliRunner().invoke(app, ["init-model", str(tmp_path / "m"), "--preset", "huge",
                                      "--tokenizer", str(tmp_path / "tok")])
    assert result.exit_code != 0
    assert "unknown preset 'huge'" in str(result.exception)


def test_select_mixture_and_curriculum_commands(tmp_path, make_testbed):
    from jraise.data.gamma import save_gamma

    cats = ["first", "upper", "reverse_upper"]
    pool = make_testbed(n_train=60, n_val_per_category=1, n_test_per_category=1, categories=cats)["pool"]
    cand = make_testbed(n_train=90, seed=1, n_val_per_category=1, n_test_per_category=1, categories=cats)["pool"]
    save_gamma(np.eye(3) + 0.5 * np.eye(3)[:, [1, 2, 0]], cats, tmp_path / "g")
    runner = CliRunner()
    result = runner.invoke(app, ["select", "mixture", "--pool", str(pool), "--gamma", str(tmp_path / "g" / "gamma.json"),
                                 "--out", str(tmp_path / "mix.jsonl"), "--candidates", str(cand), "--edit", "0.1"])
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "mix.jsonl").read_text().splitlines()) == 60
    (tmp_path / "tiers.json").write_text(json.dumps({"first": 0, "upper": 0, "reverse_upper": 2}))
    result = runner.invoke(app, ["curriculum", "--pool", str(tmp_path / "mix.jsonl"), "--tiers",
                                 str(tmp_path / "tiers.json"), "--out", str(tmp_path / "order.txt")])
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "order.txt").read_text().splitlines()) == 1 + 180  # header + entries
    # Replicate Gammas: first -> upper agreed by all three (an edge), upper -> reverse_upper only by two
    # of three with a large spread (no edge): tiers first base, upper dependent, reverse_upper middle.
    for k, (a, b) in enumerate(((0.6, 1.2), (0.5, -0.8), (0.7, 1.0))):
        g = np.eye(3)
        g[1, 0], g[2, 1] = a, b  # Gamma[upper, first], Gamma[reverse_upper, upper]
        save_gamma(g, cats, tmp_path / f"rep{k}")
    result = runner.invoke(app, ["curriculum", "--pool", str(tmp_path / "mix.jsonl"), "--out", str(tmp_path / "o2.txt"),
                                 *[x for k in range(3) for x in ("--gamma", str(tmp_path / f"rep{k}" / "gamma.json"))]])
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "o2.txt.meta.json").read_text())
    assert meta["tiers"] == {"first": 0, "upper": 2, "reverse_upper": 1} and len(meta["gamma"]) == 3
    assert meta["alpha"] == 0.05


def test_select_raise_then_train_with_the_policy(tmp_path, make_testbed):
    paths = make_testbed(n_train=40, n_val_per_category=2, n_test_per_category=1, categories=["first", "add"])
    runner = CliRunner()
    result = runner.invoke(app, ["init-model", str(tmp_path / "m"), "--tokenizer", str(paths["tokenizer"])])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["select", "raise", "--model", str(tmp_path / "m"), "--pool", str(paths["pool"]),
                                 "--val", str(paths["val"]), "--out", str(tmp_path / "policy"), "--episodes", "2",
                                 "--steps", "3", "--batch-size", "8", "--clusters", "2", "--max-len", "128"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "policy" / "reward_curve.png").is_file()
    result = runner.invoke(app, ["train", "--model", str(tmp_path / "m"), "--data", str(paths["pool"]),
                                 "--eval-data", str(paths["val"]), "--out", str(tmp_path / "run"), "--selector", "raise",
                                 "--policy", str(tmp_path / "policy"), "--max-steps", "4", "--lr", "1e-3",
                                 "--max-len", "128"])
    assert result.exit_code == 0, result.output
    picks = json.loads((tmp_path / "run" / "selections.json").read_text())["indices"]
    assert np.asarray(picks).shape == (4, 8)
    assert load_model(tmp_path / "run" / "final")[1].vocab_size > 0
    # --sample-policy draws the batches from the policy (seeded): same shape, recorded as sampled.
    result = runner.invoke(app, ["train", "--model", str(tmp_path / "m"), "--data", str(paths["pool"]),
                                 "--eval-data", str(paths["val"]), "--out", str(tmp_path / "drawn"), "--selector",
                                 "raise", "--policy", str(tmp_path / "policy"), "--max-steps", "4", "--lr", "1e-3",
                                 "--max-len", "128", "--sample-policy", "--seed", "3"])
    assert result.exit_code == 0, result.output
    drawn = json.loads((tmp_path / "drawn" / "selections.json").read_text())
    assert (drawn["deployment"], drawn["seed"]) == ("sample", 3) and np.asarray(drawn["indices"]).shape == (4, 8)
    assert drawn["indices"] != picks
    # The README's user-loop example: the policy as a jitted selector.
    import jax

    from jraise.jobs.raise_policy import load_selector
    from jraise.select.rl.selector import StepInfo

    selector = load_selector(tmp_path / "policy")
    select = jax.jit(selector.select)
    state = selector.init(jax.random.key(0))
    indices, state = select(state, StepInfo(step=1, total_steps=4, val_loss=2.0))
    assert indices.shape == (8,) and int(state.counts.sum()) == 8


def test_interactions_command_writes_gamma(tmp_path, make_testbed):
    paths = make_testbed(n_train=60, n_val_per_category=4, n_test_per_category=1, categories=["first", "add", "upper"])
    runner = CliRunner()
    assert runner.invoke(app, ["init-model", str(tmp_path / "m"), "--tokenizer", str(paths["tokenizer"])]).exit_code == 0
    result = runner.invoke(app, ["interactions", "--model", str(tmp_path / "m"), "--pool", str(paths["pool"]),
                                 "--eval", str(paths["val"]), "--out", str(tmp_path / "g"), "--steps", "6",
                                 "--batch-size", "4", "--lr", "3e-3", "--max-len", "128", "--self-effect-floor", "1e-4"])
    assert result.exit_code == 0, result.output
    gamma = json.loads((tmp_path / "g" / "gamma.json").read_text())
    assert sorted(gamma["names"]) == ["add", "first", "upper"]
    assert all(gamma["matrix"][i][i] == 1.0 for i in range(3))
    assert (tmp_path / "g" / "gamma_heatmap.png").is_file()


def test_categories_command_skip_bad(tmp_path, make_testbed):
    paths = make_testbed(n_train=12, n_val_per_category=1, n_test_per_category=1, categories=["first", "add"])
    lines = paths["pool"].read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines[:6] + ['{"instruction": "x"}'] + lines[6:]) + "\n")  # line 7: no output
    runner = CliRunner()
    assert runner.invoke(app, ["init-model", str(tmp_path / "m"), "--tokenizer", str(paths["tokenizer"])]).exit_code == 0
    args = ["categories", "--model", str(tmp_path / "m"), "--pool", str(bad), "--out", str(tmp_path / "c.json"),
            "--k", "2", "--max-len", "128"]
    result = runner.invoke(app, args)
    assert result.exit_code != 0 and "line 7: field 'output'" in str(result.exception)
    result = runner.invoke(app, [*args, "--skip-bad"])
    assert result.exit_code == 0, result.output
    assert f"skipped 1 bad record of {bad} (1 missing-field;" in result.stderr
    assert sum(json.loads(result.stdout)["sizes"].values()) == 12
    saved = json.loads((tmp_path / "c.json").read_text())
    assert len(saved["categories"]) == 12 and saved["skipped"]["problems"][0]["line"] == 7
