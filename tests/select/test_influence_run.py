"""LESS/ROSE end to end on a tiny testbed: warmup, stores per epoch checkpoint, selection files,
and a re-run that reuses everything already computed."""

import json

import numpy as np
import pytest

from jraise.jobs.influence import (
    InfluenceRunConfig,
    epoch_checkpoints,
    run_influence_selection,
    warmup_epoch_lrs,
)

SMALL = dict(fraction=0.1, warmup_fraction=0.25, warmup_epochs=2, warmup_lr=1e-3, warmup_batch_size=8,
             lora_rank=2, lora_alpha=4.0, lora_dropout=0.0, max_len=256, proj_dim=32, chunk=4, group=8)


@pytest.fixture(scope="module")
def testbed(tmp_path_factory, make_testbed, make_model_dir):
    """(root, paths, model): the module's own directory for outputs, and the suite's shared testbed
    files and tiny model directory (read-only)."""
    paths = make_testbed(n_train=40, noise=0.25, n_val_per_category=1, n_test_per_category=1,
                         categories=["first", "reverse", "add"])
    return tmp_path_factory.mktemp("influence"), paths, make_model_dir(paths["tokenizer"], seed=0)


def test_rose_end_to_end_then_less_reusing_the_warmup(testbed):
    root, paths, model = testbed
    out = root / "rose" / "sel.jsonl"
    sel = run_influence_selection(model, paths["pool"], paths["val_pref"], out,
                                  InfluenceRunConfig(method="rose", **SMALL), echo=lambda *_: None)
    assert len(sel.indices) == 4 and len(set(sel.indices.tolist())) == 4
    pool_lines = paths["pool"].read_text().splitlines()
    assert out.read_text().splitlines() == [pool_lines[i] for i in sel.indices]  # records unchanged
    meta = json.loads(out.with_name("sel.jsonl.meta.json").read_text())
    assert meta["method"] == "rose" and meta["config"]["val_loss"] == "margin"
    # What the selection cost, by part; the total is their sum (the stores' times are on record).
    cost = meta["seconds"]
    assert len(cost["train_features"]) == len(cost["val_features"]) == 2 and cost["warmup"] > 0
    parts = [cost["warmup"], *cost["train_features"], *cost["val_features"], cost["scoring"]]
    assert all(p > 0 for p in parts) and cost["total"] == pytest.approx(sum(parts), abs=1e-2)
    work = root / "rose" / "sel.jsonl.work"
    ckpts = epoch_checkpoints(work / "warmup")
    assert [c["epoch"] for c in ckpts] == [0, 1]
    # The checkpoint weights known before training are the ones the run recorded.
    np.testing.assert_allclose(warmup_epoch_lrs(40, InfluenceRunConfig(method="rose", **SMALL)),
                               [c["epoch_mean_lr"] for c in ckpts], rtol=1e-6)
    assert sorted(p.name for p in (work / "features").iterdir()) == sorted(str(c["step"]) for c in ckpts)
    scores = np.load(out.with_name("sel.jsonl.scores.npy"))
    assert scores.shape == (40,) and np.all(np.isfinite(scores)) and np.all(np.abs(scores) <= 1 + 1e-5)

    # Re-running finds every store complete and gives the same selection.
    again = run_influence_selection(model, paths["pool"], paths["val_pref"], out,
                                    InfluenceRunConfig(method="rose", **SMALL), echo=lambda *_: None)
    np.testing.assert_array_equal(again.indices, sel.indices)

    # ROSE on other pairs in the same work directory (the study's `rose_model` beside `rose`): the
    # train-side stores are reused, the new pairs get their own validation store.
    other_pairs = root / "other_pairs.jsonl"
    other_pairs.write_text("\n".join(paths["val_pref"].read_text().splitlines()[:-1]) + "\n")
    other = run_influence_selection(model, paths["pool"], other_pairs, root / "rose2" / "sel.jsonl",
                                    InfluenceRunConfig(method="rose", **SMALL), work_dir=work, echo=lambda *_: None)
    assert len(other.indices) == 4
    for ckpt in ckpts:
        stores = sorted(p.name for p in (work / "features" / str(ckpt["step"])).iterdir())
        assert [n for n in stores if n.startswith("train")] == ["train"]
        assert len([n for n in stores if n.startswith("val-margin-")]) == 2, stores

    # LESS on the same warmup run (SFT validation gradients).
    less = run_influence_selection(model, paths["pool"], paths["val"], root / "less" / "sel.jsonl",
                                   InfluenceRunConfig(method="less", **SMALL), warmup_run=work / "warmup",
                                   echo=lambda *_: None)
    assert less.method == "less" and len(less.indices) == 4


def test_a_warmup_of_one_step_is_refused_before_it_runs(testbed):
    # 5% of 160 records is 8, one batch of 8: a single update, at learning rate 0 (the schedule's
    # warmup starts at 0). 212 records give 11, two updates, the second at the peak.
    one_step = InfluenceRunConfig(method="less", warmup_fraction=0.05, warmup_epochs=1, warmup_batch_size=8,
                                  warmup_lr=5e-4)
    with pytest.raises(ValueError, match=r"learn nothing: 8 records \(0.05 of 160\) at batch 8 for 1 epoch\(s\) "
                                         r"is 1 update step\(s\), all at learning rate 0 under warmup_ratio 0.03"):
        warmup_epoch_lrs(160, one_step)
    np.testing.assert_allclose(warmup_epoch_lrs(212, one_step), [2.5e-4])
    np.testing.assert_allclose(warmup_epoch_lrs(160, InfluenceRunConfig(method="less", warmup_fraction=0.05,
                                                                        warmup_epochs=1, warmup_batch_size=8,
                                                                        warmup_lr=5e-4, warmup_ratio=0.0)), [5e-4])
    # The job stops there, before any model is loaded or feature computed.
    root, paths, model = testbed
    with pytest.raises(ValueError, match="learn nothing"):
        run_influence_selection(model, paths["pool"], paths["val"], root / "one_step" / "sel.jsonl",
                                InfluenceRunConfig(method="less", **{**SMALL, "warmup_fraction": 0.2,
                                                                     "warmup_epochs": 1}), echo=lambda *_: None)
    assert not (root / "one_step" / "sel.jsonl.work" / "warmup").exists()


def test_config_errors():
    with pytest.raises(ValueError, match="method"):
        InfluenceRunConfig(method="dsir")
    with pytest.raises(ValueError, match="validation loss"):
        InfluenceRunConfig(method="less", val_loss="dpo")
    assert InfluenceRunConfig(method="less").val_loss == "sft"


def test_skip_bad_runs_past_bad_lines_and_records_them(testbed):
    """``InfluenceRunConfig(skip_bad=True)``: the pool and validation file load past their bad
    lines, the skips are echoed and recorded in the meta file, and the written records are the
    original ones; without it the first bad line is an error naming it. ``skip_bad`` is not part
    of the feature identity."""
    from jraise.data.formats import RecordError

    root, paths, model = testbed
    pool_lines = paths["pool"].read_text().splitlines()
    bad_pool = root / "bad_pool.jsonl"
    bad_pool.write_text("\n".join(pool_lines[:3] + ["[1, 2]"] + pool_lines[3:]) + "\n")  # line 4: not an object
    bad_val = root / "bad_val_pref.jsonl"
    bad_val.write_text(paths["val_pref"].read_text() + '{"prompt": "p", "chosen": "c"}\n')  # no 'rejected'
    n_val = len(paths["val_pref"].read_text().splitlines())
    out = root / "skip" / "sel.jsonl"
    config = InfluenceRunConfig(method="rose", **SMALL)
    with pytest.raises(RecordError, match="line 4"):
        run_influence_selection(model, bad_pool, bad_val, out, config, echo=lambda *_: None)
    lines = []
    skipping = InfluenceRunConfig(method="rose", skip_bad=True, **SMALL)
    sel = run_influence_selection(model, bad_pool, bad_val, out, skipping, echo=lines.append)
    assert lines[0].startswith(f"skipped 1 bad record of {bad_pool} (1 not-an-object;")
    assert lines[1].startswith(f"skipped 1 bad record of {bad_val} (1 missing-field;")
    assert lines[2] == f"rose: pool 40 examples, validation {n_val} pairs"
    assert len(sel.indices) == 4
    assert out.read_text().splitlines() == [pool_lines[i] for i in sel.indices]  # kept records, unchanged
    skipped = json.loads(out.with_name("sel.jsonl.meta.json").read_text())["skipped"]
    assert skipped["count"] == 2
    assert sorted((str(q["file"]), q["line"]) for q in skipped["problems"]) == sorted(
        [(str(bad_pool), 4), (str(bad_val), n_val + 1)])
    assert skipping.features() == config.features()  # same feature stores with or without skip_bad


def _cli_less_args(paths, model, out) -> list[str]:
    """`jraise select less` on the tiny testbed: a one-epoch warmup on 25%, LoRA r = 2, d = 64."""
    return ["select", "less", "--model", str(model), "--pool", str(paths["pool"]), "--val",
            str(paths["val"]), "--out", str(out), "--fraction", "0.1", "--warmup-fraction", "0.25",
            "--warmup-epochs", "1", "--warmup-lr", "1e-3", "--warmup-batch-size", "8", "--lora-rank", "2",
            "--lora-alpha", "4", "--max-len", "256", "--proj-dim", "64"]


def test_cli_less_with_the_factored_projection(testbed):
    from typer.testing import CliRunner

    from jraise.cli import app

    root, paths, model = testbed
    out = root / "cli-factored" / "sel.jsonl"
    args = _cli_less_args(paths, model, out)
    assert CliRunner().invoke(app, [*args, "--projection-mode", "kron"]).exit_code != 0
    result = CliRunner().invoke(app, [*args, "--projection-mode", "factored", "--no-adam-first-moment"])
    assert result.exit_code == 0, result.output
    assert json.loads(out.with_name("sel.jsonl.meta.json").read_text())["config"]["adam_first_moment"] is False
    names = {p.name for p in (out.with_name("sel.jsonl.work") / "features").glob("*/*")}
    assert {n for n in names if not n.startswith("val-sft-")} == {"train-no-first-moment"} and len(names) == 2
    assert len(out.read_text().splitlines()) == 4
    metas = sorted((out.with_name("sel.jsonl.work") / "features").glob("*/*/meta.json"))
    assert metas  # a train store and a validation store per checkpoint
    for meta in metas:
        identity = json.loads(meta.read_text())["identity"]
        assert identity["features"]["projection"]["mode"] == "factored"
        assert identity["features"]["projection"]["dim"] == 64
        assert identity.get("adam_first_moment", "absent") == (False if meta.parent.name.startswith("train")
                                                                else "absent")


def test_cli_less_defaults_to_the_sjlt_projection(testbed):
    """`jraise select less` without --projection-mode runs the sparse sketch (s = 1) end to end: its
    feature stores say so, and the selection is written; dense is one option away (its config)."""
    from typer.testing import CliRunner

    from jraise.cli import app
    from jraise.grads.projection import DEFAULT_SJLT_NNZ

    root, paths, model = testbed
    out = root / "cli-sjlt" / "sel.jsonl"
    result = CliRunner().invoke(app, _cli_less_args(paths, model, out))
    assert result.exit_code == 0, result.output
    assert len(out.read_text().splitlines()) == 4
    metas = sorted((out.with_name("sel.jsonl.work") / "features").glob("*/*/meta.json"))
    assert metas
    for meta in metas:
        projection = json.loads(meta.read_text())["identity"]["features"]["projection"]
        assert projection["mode"] == "sjlt" and projection["sjlt_nnz"] == DEFAULT_SJLT_NNZ == 1
        assert projection["dim"] == 64
    assert json.loads(out.with_name("sel.jsonl.meta.json").read_text())["config"]["projection_mode"] == "sjlt"
    assert InfluenceRunConfig(method="less").projection_mode == "sjlt"
    assert InfluenceRunConfig(method="less", projection_mode="dense").features().projection.mode == "dense"
