"""Baseline selectors: each score against a direct numpy computation, ranking, files, the CLI."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from typer.testing import CliRunner

from jraise.cli import app
from jraise.data.pool import load_pool
from jraise.data.selections import write_selection
from jraise.jobs.baselines import run_baseline
from jraise.model import init_model, load_tokenizer, preset_config
from jraise.select.base import Selection
from jraise.select.baselines import (
    full_data,
    ifd,
    ifd_from_logp,
    ifd_scores,
    longest,
    max_cosine,
    perplexity,
    perplexity_from_logp,
    random_scores,
    random_selection,
    ranked_selection,
    rds,
)
from jraise.select.rl.features import start_token_of


@pytest.fixture(scope="module")
def setup(tmp_path_factory, make_testbed):
    root = tmp_path_factory.mktemp("baselines")
    paths = make_testbed(n_train=24, n_val_per_category=2, n_test_per_category=1, categories=["first", "add", "reverse"])
    tok = load_tokenizer(paths["tokenizer"])
    pool = load_pool(paths["pool"], tok, max_len=128)
    val = load_pool(paths["val"], tok, max_len=128)
    model = init_model(preset_config("tiny", vocab_size=len(tok)), seed=0)
    return {"root": root, "paths": paths, "tok": tok, "pool": pool, "val": val, "model": model}


def _numpy_log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


WIDTH = 64  # every example is right-padded to one length: one set of compiled ops for all examples


def _padded(tokens):
    assert len(tokens) <= WIDTH
    ids, att = np.zeros((1, WIDTH), np.int32), np.zeros((1, WIDTH), np.int32)
    ids[0, : len(tokens)], att[0, : len(tokens)] = tokens, 1
    return jnp.asarray(ids), jnp.asarray(att)


def _numpy_mean_logp(model, tokens, mask):
    """Mean log p of the masked tokens, each predicted from the previous position, one example
    (right padding cannot change the logits of earlier positions of a causal model)."""
    logp = _numpy_log_softmax(np.asarray(model(*_padded(tokens)))[0, : len(tokens)])
    picked = logp[np.arange(len(tokens) - 1), tokens[1:]]
    return picked[mask[1:]].mean()


def _numpy_logps(model, pool, start):
    given_x, alone = [], []
    for tokens, mask in zip(pool.tokens, pool.loss_masks):
        tokens, mask = np.asarray(tokens), np.asarray(mask, bool)
        given_x.append(_numpy_mean_logp(model, tokens, mask))
        response = np.concatenate([[start], tokens[mask]])
        alone.append(_numpy_mean_logp(model, response, np.r_[False, np.ones(mask.sum(), bool)]))
    return np.array(given_x), np.array(alone)


@pytest.fixture(scope="module")
def numpy_logps(setup):
    """Per example: mean log p(y|x) and mean log p(y) (prompt replaced by the start token), in numpy."""
    return _numpy_logps(setup["model"], setup["pool"], start_token_of(setup["tok"]))


def _best_first(scores, k):
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]


def test_random_is_a_seeded_permutation_and_reproducible(setup):
    pool = setup["pool"]
    sel = random_selection(pool, 0.25, seed=7)
    want = np.random.default_rng(7).permutation(len(pool)).astype(np.float32)
    np.testing.assert_array_equal(sel.scores, want)
    assert sel.indices.tolist() == _best_first(want, 6)
    assert sel.method == "random" and sel.config == {"fraction": 0.25, "seed": 7}
    assert np.array_equal(random_selection(pool, 0.25, seed=7).indices, sel.indices)
    assert not np.array_equal(random_selection(pool, 0.25, seed=8).indices, sel.indices)
    with pytest.raises(ValueError, match="seed"):
        random_selection(pool, 0.25, seed=-1)


def test_full_data_and_longest(setup, tmp_path):
    pool = setup["pool"]
    full = full_data(pool)
    assert full.indices.tolist() == list(range(len(pool))) and full.scores is None and full.method == "full"
    paths = write_selection(full, pool, tmp_path / "full.jsonl")
    assert "scores" not in paths and len((tmp_path / "full.jsonl").read_text().splitlines()) == len(pool)

    sel = longest(pool, 0.5)
    want = np.array([np.count_nonzero(m) for m in pool.loss_masks], np.float32)
    np.testing.assert_array_equal(sel.scores, want)
    assert len(set(want.tolist())) < len(want)  # the testbed has ties: broken by the lower index
    assert sel.indices.tolist() == _best_first(want, 12)


def test_ranked_selection_orders_best_first_with_ties_by_index(setup):
    pool = setup["pool"]
    scores = np.zeros(len(pool), np.float32)
    scores[[5, 3, 9]] = [2.0, 2.0, 3.0]
    sel = ranked_selection(scores, 4 / len(pool), "x", pool, {"a": 1})
    assert sel.indices.tolist() == [9, 3, 5, 0]
    assert sel.config == {"fraction": 4 / len(pool), "a": 1} and sel.pool_fingerprint == pool.fingerprint
    with pytest.raises(ValueError, match="one per pool example"):
        ranked_selection(scores[:-1], 0.5, "x", pool, {})


def test_perplexity_matches_numpy(setup, numpy_logps):
    model, pool = setup["model"], setup["pool"]
    given_x, _ = numpy_logps
    ppl = np.exp(-given_x)
    low = perplexity(model, pool, 0.25, "low", batch_size=8)
    np.testing.assert_allclose(low.scores, -ppl, rtol=1e-4)
    assert low.indices.tolist() == _best_first(low.scores, 6)
    assert set(low.indices.tolist()) == set(np.argsort(ppl)[:6].tolist())
    high = perplexity(model, pool, 0.25, "high", batch_size=8)
    np.testing.assert_allclose(high.scores, ppl, rtol=1e-4)
    assert set(high.indices.tolist()) == set(np.argsort(-ppl)[:6].tolist())
    assert high.config["which"] == "high" and high.method == "perplexity"
    with pytest.raises(ValueError, match="which"):
        perplexity(model, pool, 0.25, "medium")


def test_ifd_matches_numpy_and_ranks_ifd_above_one_last(setup, numpy_logps):
    model, pool = setup["model"], setup["pool"]
    start = start_token_of(setup["tok"])
    given_x, alone = numpy_logps
    want = given_x / alone  # (-mean log p(y|x)) / (-mean log p(y))
    kept = ifd(model, pool, 1.0, start, batch_size=8, drop_above_one=False)
    np.testing.assert_allclose(kept.scores, want, rtol=1e-4)
    assert kept.indices.tolist() == _best_first(kept.scores, len(pool))

    sel = ifd(model, pool, 1.0, start, batch_size=8)
    above = want >= 1.0
    assert 0 < above.sum() < len(pool)  # a random tiny model gives both kinds (the test means something)
    assert np.all(np.isneginf(sel.scores[above])) and np.allclose(sel.scores[~above], want[~above], rtol=1e-4)
    n_below = int((~above).sum())
    assert sel.indices[:n_below].tolist() == _best_first(np.where(above, -np.inf, want), n_below)
    assert sorted(sel.indices[n_below:].tolist()) == sel.indices[n_below:].tolist()  # ranked last, by index
    assert sel.config["n_ranked_last"] == int(above.sum())


def test_random_scores_and_perplexity_from_logp_on_toy_arrays():
    scores = random_scores(10, seed=3)
    assert scores.dtype == np.float32 and sorted(scores.tolist()) == list(range(10))  # a permutation of 0..9
    np.testing.assert_array_equal(scores, random_scores(10, seed=3))
    assert not np.array_equal(scores, random_scores(10, seed=4))
    with pytest.raises(ValueError, match="seed"):
        random_scores(10, seed=-1)
    ppl = perplexity_from_logp(np.array([0.0, -1.0, -np.log(4.0)], np.float32))
    assert ppl.dtype == np.float64
    np.testing.assert_allclose(ppl, [1.0, np.e, 4.0], rtol=1e-6)


def test_ifd_helpers_handle_undefined_values():
    values = ifd_from_logp(np.array([-2.0, -1.0, 0.0]), np.array([-4.0, -0.5, 0.0]))
    np.testing.assert_allclose(values[:2], [0.5, 2.0])
    assert np.isnan(values[2])
    np.testing.assert_array_equal(ifd_scores(values), [0.5, -np.inf, -np.inf])
    np.testing.assert_array_equal(ifd_scores(values, drop_above_one=False), [0.5, 2.0, -np.inf])


def test_rds_matches_numpy_max_cosine(setup):
    model, pool, val = setup["model"], setup["pool"], setup["val"]

    def pooled(p):
        return np.stack([np.asarray(model.hidden_states(*_padded(t)))[0, : len(t)].mean(0)
                         for t in p.tokens]).astype(np.float64)

    a, b = pooled(pool), pooled(val)
    cos = (a @ b.T) / np.linalg.norm(a, axis=1)[:, None] / np.linalg.norm(b, axis=1)[None, :]
    sel = rds(model, pool, val, 0.25, batch_size=8)
    np.testing.assert_allclose(sel.scores, cos.max(1), rtol=1e-4, atol=1e-5)
    assert set(sel.indices.tolist()) == set(np.argsort(-cos.max(1), kind="stable")[:6].tolist())
    assert sel.config["val_fingerprint"] == val.fingerprint and sel.config["reduce"] == "max"
    np.testing.assert_allclose(max_cosine(np.array([[1.0, 0.0], [0.0, 0.0]]), np.array([[2.0, 0.0], [1.0, 1.0]])),
                               [1.0, 0.0])
    with pytest.raises(ValueError, match="targets"):
        max_cosine(np.ones((2, 3)), np.ones((2, 4)))


def test_run_baseline_names_missing_arguments(setup, tmp_path):
    pool_file = setup["paths"]["pool"]
    with pytest.raises(ValueError, match="model_dir"):
        run_baseline("ifd", pool_file, tmp_path / "o.jsonl", tokenizer_dir=setup["paths"]["tokenizer"])
    with pytest.raises(ValueError, match="val_file"):
        run_baseline("rds", pool_file, tmp_path / "o.jsonl", model_dir=tmp_path)
    with pytest.raises(ValueError, match="tokenizer_dir"):
        run_baseline("longest", pool_file, tmp_path / "o.jsonl")
    with pytest.raises(ValueError, match="unknown method"):
        run_baseline("shortest", pool_file, tmp_path / "o.jsonl")
    sel = run_baseline("random", pool_file, tmp_path / "r.jsonl", tokenizer_dir=setup["paths"]["tokenizer"],
                       fraction=0.5, seed=3, max_len=128)
    assert np.array_equal(np.load(tmp_path / "r.jsonl.scores.npy"), sel.scores)


def test_cli_longest_and_ifd_end_to_end(setup):
    root, paths = setup["root"], setup["paths"]
    runner = CliRunner()
    model_dir = root / "m"
    assert runner.invoke(app, ["init-model", str(model_dir), "--tokenizer", str(paths["tokenizer"])]).exit_code == 0
    common = ["--pool", str(paths["pool"]), "--max-len", "128", "--fraction", "0.25"]
    result = runner.invoke(app, ["select", "ifd", *common, "--out", str(root / "ifd.jsonl")])
    assert result.exit_code != 0 and "--model" in result.output

    result = runner.invoke(app, ["select", "longest", *common, "--out", str(root / "long.jsonl"),
                                 "--tokenizer", str(paths["tokenizer"])])
    assert result.exit_code == 0, result.output
    meta = json.loads((root / "long.jsonl.meta.json").read_text())
    assert meta["method"] == "longest" and meta["indices"] == longest(setup["pool"], 0.25).indices.tolist()
    assert len((root / "long.jsonl").read_text().splitlines()) == 6

    result = runner.invoke(app, ["select", "ifd", *common, "--out", str(root / "ifd.jsonl"), "--model", str(model_dir),
                                 "--batch-size", "8"])
    assert result.exit_code == 0, result.output
    from jraise.model import load_model

    want = ifd(load_model(model_dir)[0], setup["pool"], 0.25, start_token_of(setup["tok"]), batch_size=8)
    meta = json.loads((root / "ifd.jsonl.meta.json").read_text())
    assert meta["method"] == "ifd" and meta["indices"] == want.indices.tolist()
    np.testing.assert_allclose(np.load(root / "ifd.jsonl.scores.npy"), want.scores, rtol=1e-5)
    assert isinstance(want, Selection)


def _pool_with_bad_lines(setup, path):
    """The testbed pool with a non-JSON line (file line 5) and a record missing ``output`` (file
    line 10) put in the middle; returns the kept records, in file order."""
    lines = setup["paths"]["pool"].read_text().splitlines()
    missing = json.loads(lines[0])
    missing.pop("output")
    missing["id"] = "no-output"
    bad = lines[:4] + ["{not json"] + lines[4:8] + [json.dumps(missing)] + lines[8:]
    path.write_text("\n".join(bad) + "\n")
    return [json.loads(line) for line in lines]


def test_run_baseline_skip_bad_writes_the_original_kept_records(setup, tmp_path):
    from jraise.data.formats import RecordError

    pool_file, tok_dir = tmp_path / "bad.jsonl", setup["paths"]["tokenizer"]
    kept = _pool_with_bad_lines(setup, pool_file)
    with pytest.raises(RecordError, match="line 5"):
        run_baseline("random", pool_file, tmp_path / "x.jsonl", tokenizer_dir=tok_dir, max_len=128)
    assert not (tmp_path / "x.jsonl").exists()

    lines = []
    out = tmp_path / "r.jsonl"
    sel = run_baseline("random", pool_file, out, tokenizer_dir=tok_dir, fraction=1.0, seed=5, max_len=128,
                       skip_bad=True, echo=lines.append)
    assert sorted(sel.indices.tolist()) == list(range(len(kept)))  # indices count the kept records
    assert sel.indices.tolist() != sorted(sel.indices.tolist())  # a shuffle: records after the bad lines move
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert written == [kept[i] for i in sel.indices]  # the originals, not shifted by the skipped lines
    assert [r["id"] for r in written] == [setup["pool"].ids[i] for i in sel.indices]
    meta = json.loads((tmp_path / "r.jsonl.meta.json").read_text())
    skipped = meta["skipped"]
    assert skipped["count"] == 2 and skipped["by_file"] == {str(pool_file): 2}
    assert skipped["by_reason"] == {"malformed-json": 1, "missing-field": 1}
    assert [(p["file"], p["line"], p["field"], p["reason"]) for p in skipped["problems"]] == [
        (str(pool_file), 5, None, "malformed-json"), (str(pool_file), 10, "output", "missing-field")]
    assert lines == [f"skipped 2 bad records of {pool_file} (1 malformed-json, 1 missing-field; "
                     f'see "skipped" in {tmp_path / "r.jsonl.meta.json"})']

    # A clean pool: no "skipped" key, nothing echoed.
    run_baseline("longest", setup["paths"]["pool"], tmp_path / "l.jsonl", tokenizer_dir=tok_dir, fraction=0.25,
                 max_len=128, skip_bad=True, echo=lines.append)
    assert "skipped" not in json.loads((tmp_path / "l.jsonl.meta.json").read_text()) and len(lines) == 1


def test_cli_longest_skip_bad(setup, tmp_path):
    pool_file = tmp_path / "bad.jsonl"
    kept = _pool_with_bad_lines(setup, pool_file)
    args = ["select", "longest", "--pool", str(pool_file), "--out", str(tmp_path / "l.jsonl"), "--tokenizer",
            str(setup["paths"]["tokenizer"]), "--max-len", "128", "--fraction", "0.25"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0 and "line 5" in str(result.exception)

    result = CliRunner().invoke(app, [*args, "--skip-bad"])
    assert result.exit_code == 0, result.output
    assert f"skipped 2 bad records of {pool_file}" in result.stderr
    assert json.loads(result.stdout)["selected"] == 6  # stdout stays one JSON document
    meta = json.loads((tmp_path / "l.jsonl.meta.json").read_text())
    assert meta["skipped"]["count"] == 2
    want = longest(setup["pool"], 0.25).indices.tolist()  # the clean pool: the same kept records
    assert meta["indices"] == want
    assert [json.loads(line) for line in (tmp_path / "l.jsonl").read_text().splitlines()] == [kept[i] for i in want]
