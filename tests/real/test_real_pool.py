"""The real instruction pool (`jraise.real_pool.write_real_pool`) built from the real evaluation
sets in the cache: held-out sets disjoint from the pool by content, exactly the configured noise,
truth kept out of the pool, determinism by seed, the length policy."""

import json
from pathlib import Path

import pytest

from jraise.real_pool import (
    DEFAULT_TARGETS,
    MANIFEST,
    NOISE_KINDS,
    SPLITS,
    TRAINING_FIELDS,
    answer_key,
    content_key,
    read_sources,
    write_real_pool,
)

NOISE = 0.2
N_TEST = 300


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def source(eval_data_dir):
    """({id: source record}, {category: normaliser})."""
    sources, normalisers, _ = read_sources(eval_data_dir)
    return {r["id"]: r for records in sources.values() for r in records}, normalisers


@pytest.fixture(scope="module")
def built(eval_data_dir, tmp_path_factory):
    """Paths of the default pool at seed 0, built twice, and at seed 1."""
    root = tmp_path_factory.mktemp("real_pool")
    return {name: write_real_pool(root / name, eval_data_dir=eval_data_dir, seed=seed, noise=NOISE, n_test=N_TEST)
            for name, seed in (("a", 0), ("again", 0), ("other_seed", 1))}


@pytest.fixture(scope="module")
def pool(built):
    paths = built["a"]
    return {**{split: read_jsonl(paths[split]) for split in SPLITS},
            "manifest": json.loads(paths["manifest"].read_text())}


def test_held_out_sets_are_disjoint_from_the_pool_and_each_other_by_content(pool, source):
    records, _ = source
    pool_keys = {content_key(records[r["id"]]) for r in pool["pool"]}
    val_keys = [content_key(records[r["id"]]) for r in pool["val"]]
    test_keys = [content_key(r) for r in pool["test"]]
    assert len(set(val_keys + test_keys)) == len(val_keys) + len(test_keys)
    assert not pool_keys & set(val_keys + test_keys)
    pool_ids = {r["id"] for r in pool["pool"]}
    assert not pool_ids & {r["id"] for r in pool["val"] + pool["test"]}
    # a question that repeats across ids (PIQA has some) is dropped from the pool, and counted
    dropped = sum(c["same_content_as_held_out"] for c in pool["manifest"]["categories"].values())
    assert dropped > 0


def test_exactly_the_configured_noise_is_planted_and_its_truth_matches_the_source(pool, source):
    records, normalisers = source
    by_id = {r["id"]: r for r in pool["pool"]}
    noise = pool["noise"]
    assert len(noise) == round(NOISE * len(pool["pool"])) == pool["manifest"]["noisy"]
    assert len({t["id"] for t in noise}) == len(noise) and {t["id"] for t in noise} <= set(by_id)
    for t in noise:
        clean = records[t["id"]]
        assert t["kind"] in NOISE_KINDS and t["category"] == clean["category"]
        assert t["clean_output"] == clean["output"]
        normaliser = normalisers[clean["category"]]
        wrong = answer_key(by_id[t["id"]]["output"], normaliser)
        assert wrong != answer_key(clean["output"], normaliser)
        assert wrong not in {answer_key(a, normaliser) for a in clean.get("references", ())}
        if t["kind"] == "truncated":
            assert clean["output"].startswith(by_id[t["id"]]["output"])
        if t["kind"] == "wrong_option" and "options" in clean:
            assert by_id[t["id"]]["output"] in clean["options"]
    noisy_ids = {t["id"] for t in noise}
    assert all(r["output"] == records[r["id"]]["output"] for r in pool["pool"] if r["id"] not in noisy_ids)
    kinds = pool["manifest"]["noise_kinds"]
    assert sum(kinds.values()) == len(noise) and all(kinds[k] > 0 for k in NOISE_KINDS)
    per_category = {c: v["noisy"] for c, v in pool["manifest"]["categories"].items()}
    assert sum(per_category.values()) == len(noise)


def test_same_seed_gives_identical_files_and_another_seed_differs(built):
    for split in (*SPLITS, "manifest"):
        assert built["a"][split].read_bytes() == built["again"][split].read_bytes(), split
    for split in ("pool", "test", "noise"):
        assert built["a"][split].read_bytes() != built["other_seed"][split].read_bytes(), split


def test_pool_and_val_records_carry_no_truth_fields(pool):
    assert all(tuple(r) == TRAINING_FIELDS for r in pool["pool"] + pool["val"])


def test_test_sets_are_large_enough_and_hold_valid_answers(pool, source):
    records, _ = source
    for target in DEFAULT_TARGETS:
        test = [r for r in pool["test"] if r["category"] == target]
        assert len(test) >= N_TEST
        val = [r for r in pool["val"] if r["category"] == target]
        assert len(val) == pool["manifest"]["n_val"]
    for r in pool["test"]:
        assert r == records[r["id"]]
        if "options" in r:
            assert 0 <= r["answer"] < len(r["options"]) and r["options"][r["answer"]] == r["output"]
        else:
            assert r["reference"].strip()


def test_preference_pairs_choose_the_right_answer(pool, source):
    records, normalisers = source
    assert [p["id"] for p in pool["val_pref"]] == [r["id"] for r in pool["val"]]
    for pair in pool["val_pref"]:
        clean = records[pair["id"]]
        normaliser = normalisers[clean["category"]]
        assert pair["prompt"] == clean["instruction"] and pair["chosen"] == clean["output"]
        assert answer_key(pair["chosen"], normaliser) != answer_key(pair["rejected"], normaliser)
        if "options" in clean:
            assert pair["rejected"] in clean["options"]


def test_manifest_states_the_policy_and_counts(pool, eval_data_dir):
    manifest = pool["manifest"]
    assert manifest["length_policy"]["unit"] == "characters"
    assert manifest["targets"] == list(DEFAULT_TARGETS) and manifest["seed"] == 0
    assert manifest["pool"] == len(pool["pool"])
    assert all(c["pool"] <= manifest["per_category"] for c in manifest["categories"].values())
    for category, c in manifest["categories"].items():
        assert sum(r["category"] == category for r in pool["pool"]) == c["pool"]
        assert c["source"] == c["too_long"] + c["val"] + c["test"] + c["same_content_as_held_out"] + c["over_cap"] + c["pool"]
    assert len(manifest["source"]["manifest_sha256"]) == 64


def test_token_length_policy_with_the_smollm2_tokenizer(eval_data_dir, smollm2_dir, tmp_path):
    from jraise.model import load_tokenizer

    tokenizer = load_tokenizer(smollm2_dir)
    paths = write_real_pool(tmp_path / "pool", eval_data_dir=eval_data_dir, categories=("pubmedqa", "piqa"),
                            targets=("piqa",), n_test=50, max_tokens=256, tokenizer=tokenizer)
    manifest = json.loads(paths["manifest"].read_text())
    assert manifest["length_policy"]["unit"] == "tokens" and manifest["length_policy"]["max"] == 256
    assert manifest["categories"]["pubmedqa"]["too_long"] > 0
    noise = {t["id"]: t["clean_output"] for t in read_jsonl(paths["noise"])}
    for r in read_jsonl(paths["pool"]) + read_jsonl(paths["test"]):
        n = sum(len(tokenizer(text, add_special_tokens=False)["input_ids"])
                for text in (r["instruction"], noise.get(r["id"], r["output"])))
        assert n <= 256


def test_an_earlier_pool_is_replaced_and_other_directories_are_kept(eval_data_dir, tmp_path):
    kwargs = dict(eval_data_dir=eval_data_dir, categories=("openbookqa", "siqa"), targets=("siqa",), n_test=20,
                  per_category=50)
    out = tmp_path / "pool"
    write_real_pool(out, seed=0, **kwargs)
    write_real_pool(out, seed=1, **kwargs)
    assert json.loads((out / MANIFEST).read_text())["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pool"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        write_real_pool(other, **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "pool"]
    assert (other / "keep.txt").read_text() == "x"


def test_per_target_caps_the_targets_and_is_recorded(eval_data_dir, tmp_path):
    paths = write_real_pool(tmp_path / "pool", eval_data_dir=eval_data_dir, categories=("openbookqa", "siqa"),
                            targets=("siqa",), n_test=20, per_category=50, per_target=10)
    manifest = json.loads(paths["manifest"].read_text())
    assert manifest["per_target"] == 10 and manifest["per_category"] == 50
    assert manifest["categories"]["siqa"]["pool"] == 10 and manifest["categories"]["openbookqa"]["pool"] == 50
    assert sum(r["category"] == "siqa" for r in read_jsonl(paths["pool"])) == 10
    assert len(read_jsonl(paths["noise"])) == round(0.2 * 60)
