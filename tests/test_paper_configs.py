"""jraise.paper_configs and its command line benchmarks/paper_configs.py: the shipped paper
configurations validate and dry-run without weights; the architecture arithmetic matches published
counts and the real jraise model; bad configurations fail naming the file, the step and the option;
run mode checks inputs first and stops at the first failing step."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from jraise import paper_configs as pc

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "paper_configs.py"
CONFIG_DIR = ROOT / "benchmarks" / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.json"))


def _config(name):
    return pc.load_config(CONFIG_DIR / name)


def _write(tmp_path, config, name="bad.json"):
    path = tmp_path / name
    path.write_text(json.dumps(config, indent=1))
    return path


def _step_index(config, words):
    return next(i for i, s in enumerate(config["steps"]) if s["run"][: len(words)] == words)


# ----------------------------------------------------------------------------------------------
# The shipped configurations
# ----------------------------------------------------------------------------------------------

def test_the_four_published_setups_are_shipped():
    names = {p.name for p in CONFIGS}
    assert {"raise_llama32_1b_alpaca.json", "less_llama2_7b_tulu.json", "rose_shp_se_hh.json",
            "beyond_iid_deita10k.json"} <= names
    methods = {pc.load_config(p)["method"] for p in CONFIGS}
    assert methods == {"raise", "less", "rose", "beyond_iid"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_validates_and_plans(path, tmp_path):
    config = pc.load_config(path)
    steps = pc.validate(config, path)
    assert [s["index"] for s in steps] == list(range(len(config["steps"])))
    rows = pc.plan(config, models=tmp_path / "m", data=tmp_path / "d", work=tmp_path / "w", steps=steps)
    assert len(rows) == len(config["steps"])
    for row in rows:
        assert row["argv"] and not any("${" in a for a in row["argv"])  # every placeholder expanded
        assert row["detail"]
    trained = [r for r in rows if r["optimizer_steps"]]
    assert trained and all(r["memory_bytes"] > r["weights_bytes"] > 0 for r in trained)
    assert config["notes"] and config["paper"]["arxiv"]


def test_the_less_setup_reads_its_records_as_less_does():
    # every select and train step renders and masks with LESS's own tulu rules (jraise.data.less_tulu)
    from jraise.data.formats import RECORD_FORMATS

    config = _config("less_llama2_7b_tulu.json")
    reading = [s["run"] for s in config["steps"] if s["run"][0] in ("select", "train")]
    assert len(reading) == 8 and "less-tulu" in RECORD_FORMATS
    for run in reading:
        assert run[run.index("--record-format") + 1] == "less-tulu", run[:2]


def test_dry_run_prints_every_plan_without_weights_or_data(tmp_path):
    work = tmp_path / "work"
    run = subprocess.run([sys.executable, str(SCRIPT), *map(str, CONFIGS), "--dry-run", "--models",
                          str(tmp_path / "models"), "--data", str(tmp_path / "data"), "--work", str(work)],
                         check=False, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    for path in CONFIGS:
        assert f"== {pc.load_config(path)['name']} (" in out
    assert out.count("opt.steps") == len(CONFIGS)
    assert "1,235,814,400 parameters" in out and "6,738,415,616 parameters" in out
    assert f"missing  {tmp_path / 'models' / 'Llama-3.2-1B'}" in out  # listed, not an error
    assert "jraise select less --model" in out and "--proj-dim 8192" in out
    assert not work.exists() and not (tmp_path / "paper_runs").exists()  # a dry run writes nothing


# ----------------------------------------------------------------------------------------------
# Architecture arithmetic
# ----------------------------------------------------------------------------------------------

def test_parameter_count_of_published_architectures():
    assert pc.parameter_count(_config("raise_llama32_1b_alpaca.json")["model"]["hf_config"]) == 1_235_814_400
    assert pc.parameter_count(_config("less_llama2_7b_tulu.json")["model"]["hf_config"]) == 6_738_415_616
    assert pc.parameter_count(_config("beyond_iid_deita10k.json")["model"]["hf_config"]) == 8_030_261_248


@pytest.mark.parametrize("model_type,tied", [("llama", False), ("llama", True), ("qwen2", False)])
def test_parameter_count_equals_the_real_jraise_model(model_type, tied):
    import jax
    from flax import nnx

    from jraise.model import init_model, preset_config

    config = preset_config("tiny", vocab_size=67, model_type=model_type, tie_word_embeddings=tied,
                           attention_bias=model_type == "qwen2")
    model = init_model(config)
    real = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert pc.parameter_count(config.to_hf_dict()) == real


def test_lora_count_is_rank_times_fan_in_plus_fan_out_over_targets_and_layers():
    import jax
    from flax import nnx

    from jraise.model import init_model, preset_config
    from jraise.model.lora import LoRAConfig, add_lora

    hf = _config("raise_llama32_1b_alpaca.json")["model"]["hf_config"]
    h, q, kv, layers = 2048, 32 * 64, 8 * 64, 16
    for r in (1, 8, 128):
        expected = r * ((h + q) + (h + kv) + (h + kv) + (q + h)) * layers
        assert pc.lora_parameter_count(hf, r) == expected
        assert pc.lora_parameter_count(hf, r, targets=("q", "v")) == r * ((h + q) + (h + kv)) * layers
    mlp = pc.lora_parameter_count(hf, 4, targets=("gate_proj", "up_proj", "down_proj"))
    assert mlp == 4 * 3 * (2048 + 8192) * layers
    with pytest.raises(ValueError, match="unknown LoRA target"):
        pc.lora_parameter_count(hf, 4, targets=("w_proj",))
    # and the adapters jraise attaches have exactly that many parameters
    config = preset_config("tiny", vocab_size=50)
    model = init_model(config)
    add_lora(model, LoRAConfig(rank=3, alpha=6))
    real = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    assert pc.lora_parameter_count(config.to_hf_dict(), 3) == real


def test_plan_numbers_follow_the_published_settings():
    raise_rows = pc.plan(_config("raise_llama32_1b_alpaca.json"))
    by = {r["name"]: r for r in raise_rows}
    # 1% of 52,002 = 520 records, 3 epochs of 16-example steps = 99 steps for every method
    assert pc.budget_steps(_config("raise_llama32_1b_alpaca.json")) == 99
    assert by["train random 1%"]["optimizer_steps"] == 99 and by["train random 1%"]["records"] == 520
    assert by["train with the policy"]["optimizer_steps"] == 99
    assert by["RAISE policy (PPO)"]["optimizer_steps"] == 20 * 99
    full = by["RAISE policy (PPO)"]
    assert full["trainable_params"] == 1_235_814_400
    assert full["adam_bytes"] == 8 * 1_235_814_400 and full["master_bytes"] == 4 * 1_235_814_400
    assert full["weights_bytes"] == 4 * 1_235_814_400 and full["weights_bytes_bf16"] == 2 * 1_235_814_400

    less = {r["name"]: r for r in pc.plan(_config("less_llama2_7b_tulu.json"))}
    warm = less["LoRA warmup = random-5% run"]
    assert warm["records"] == 13_534 and warm["optimizer_steps"] == 106 * 4  # ceil(13,534 / 128) x 4 epochs
    lora = pc.lora_parameter_count(_config("less_llama2_7b_tulu.json")["model"]["hf_config"], 128)
    assert warm["trainable_params"] == lora and warm["adam_bytes"] == 8 * lora
    assert warm["weights_dtype"] == "bfloat16" and warm["weights_bytes"] == 2 * 6_738_415_616
    mmlu = less["LESS select for MMLU"]
    assert mmlu["optimizer_steps"] == 0  # the shared warmup run is reused
    assert mmlu["store_bytes"] == (270_679 + 285) * 8192 * 2 * 4  # N x d x 2 bytes per checkpoint
    assert mmlu["weights_dtype"] == "bfloat16"  # restored in the warmup run's dtype
    assert less["train on LESS-MMLU 5%"]["records"] == 13_534

    beyond = {r["name"]: r for r in pc.plan(_config("beyond_iid_deita10k.json"))}
    assert beyond["interactions -> Gamma"]["optimizer_steps"] == 29 * 1250  # 28 categories + baseline
    assert beyond["train DT-CSFT curriculum"]["optimizer_steps"] == 235  # ceil(30,000 / 128)
    assert beyond["train DEITA-10K"]["optimizer_steps"] == 3 * 79


# ----------------------------------------------------------------------------------------------
# Validation errors
# ----------------------------------------------------------------------------------------------

def test_a_misspelled_option_names_the_file_the_step_and_the_option(tmp_path, capsys):
    config = _config("less_llama2_7b_tulu.json")
    i = _step_index(config, ["select", "less"])
    config["steps"][i]["run"] = [("--fractoin" if a == "--fraction" else a) for a in config["steps"][i]["run"]]
    path = _write(tmp_path, config)
    with pytest.raises(pc.ConfigError) as err:
        pc.validate(config, path)
    message = str(err.value)
    assert str(path) in message and f"step {i}" in message and "--fractoin" in message
    assert "did you mean --fraction" in message
    assert pc.run_configs([path], dry_run=True) == 2
    stderr = capsys.readouterr().err
    assert str(path) in stderr and f"step {i}" in stderr and "--fractoin" in stderr


def test_an_unknown_subcommand_names_the_file_and_the_step(tmp_path):
    config = _config("raise_llama32_1b_alpaca.json")
    config["steps"][2]["run"][1] = "raisee"
    config["steps"][1]["run"][0] = "trian"
    path = _write(tmp_path, config)
    with pytest.raises(pc.ConfigError) as err:
        pc.validate(config, path)
    lines = str(err.value).splitlines()
    assert any(str(path) in ln and "step 1" in ln and "'trian'" in ln and "did you mean 'train'" in ln for ln in lines)
    assert any(str(path) in ln and "step 2" in ln and "'raisee'" in ln and "'jraise select'" in ln for ln in lines)


def test_bad_values_missing_options_and_placeholders_are_errors(tmp_path):
    config = _config("beyond_iid_deita10k.json")
    config["steps"][0]["run"][config["steps"][0]["run"].index("--steps") + 1] = "many"
    config["steps"][1]["run"] = ["select", "mixture", "--pool", "x", "--out", "y"]  # no --gamma
    config["steps"][2]["run"][2] = "${data.nope}"
    config["steps"][3]["run"].append("--help")
    with pytest.raises(pc.ConfigError) as err:
        pc.validate(config, tmp_path / "c.json")
    message = str(err.value)
    assert "step 0" in message and "'--steps'" in message
    assert "step 1" in message and "Missing option '--gamma'" in message
    assert "step 2" in message and "${data.nope}" in message
    assert "step 3" in message and "--help" in message


def test_structural_problems_are_all_reported(tmp_path):
    config = _config("rose_shp_se_hh.json")
    broken = copy.deepcopy(config)
    del broken["paper"]
    with pytest.raises(pc.ConfigError, match="missing required key 'paper'"):
        pc.validate(broken, "x.json")
    broken = copy.deepcopy(config)
    broken["method"] = "lesss"
    del broken["model"]["hf_config"]["num_key_value_heads"]
    broken["data"]["pool"]["records"] = "many"
    with pytest.raises(pc.ConfigError) as err:
        pc.validate(broken, "x.json")
    message = str(err.value)
    assert "unknown method 'lesss'" in message and "num_key_value_heads" in message and "data.pool.records" in message
    # a method whose command no step runs
    broken = copy.deepcopy(config)
    broken["method"] = "raise"
    with pytest.raises(pc.ConfigError, match="no step runs jraise select raise"):
        pc.validate(broken, "x.json")
    # invalid JSON names the file and the line
    bad = tmp_path / "broken.json"
    bad.write_text('{"name": "x",\n "steps": [}')
    with pytest.raises(pc.ConfigError, match=r"broken.json: not valid JSON \(line 2"):
        pc.load_config(bad)


def test_step_counts_must_match_the_budget(tmp_path):
    config = _config("raise_llama32_1b_alpaca.json")
    i = _step_index(config, ["select", "raise"])
    run = config["steps"][i]["run"]
    run[run.index("--steps") + 1] = "100"
    with pytest.raises(pc.ConfigError, match=rf"step {i}: --steps 100 differs from the budget's 99"):
        pc.validate(config, tmp_path / "c.json")


# ----------------------------------------------------------------------------------------------
# Paths and running
# ----------------------------------------------------------------------------------------------

def _tiny_setup(tmp_path):
    """The RAISE config with its model directory and two data files present (fakes)."""
    config = _config("raise_llama32_1b_alpaca.json")
    models, data = tmp_path / "models", tmp_path / "data"
    model_dir = models / "Llama-3.2-1B"
    model_dir.mkdir(parents=True)
    hf = dict(config["model"]["hf_config"], num_hidden_layers=15)
    (model_dir / "config.json").write_text(json.dumps(hf))
    (data / "alpaca").mkdir(parents=True)
    (data / "alpaca" / "alpaca_data.json").write_text("[]")
    (data / "raise").mkdir()
    (data / "raise" / "val_mmlu_dev_57.jsonl").write_text('{"prompt": "a", "response": "b"}\n' * 3)
    return config, models, data


def test_dry_run_reports_present_paths_counts_and_architecture_mismatches(tmp_path, capsys):
    _, models, data = _tiny_setup(tmp_path)
    path = CONFIG_DIR / "raise_llama32_1b_alpaca.json"
    assert pc.run_configs([path], dry_run=True, models=models, data=data, work=tmp_path / "w") == 0
    out = capsys.readouterr().out
    assert f"present  {models / 'Llama-3.2-1B'}" in out
    assert f"present  {data / 'alpaca' / 'alpaca_data.json'}" in out
    assert f"missing  {data / 'eval' / 'mmlu_test.jsonl'}" in out
    assert "num_hidden_layers is 15, the configuration says 16" in out
    assert "3 records, the configuration expects 57" in out


def test_run_mode_refuses_missing_inputs_before_running_anything(tmp_path, capsys):
    path = CONFIG_DIR / "less_llama2_7b_tulu.json"
    code = pc.run_configs([path], models=tmp_path / "m", data=tmp_path / "d", work=tmp_path / "w")
    assert code == 2
    err = capsys.readouterr().err
    assert "cannot run" in err and f"missing: {tmp_path / 'm' / 'Llama-2-7b-hf'}" in err
    assert not (tmp_path / "w").exists()
    with pytest.raises(ValueError, match="one configuration at a time"):
        pc.run_configs([path, path])


def test_the_command_line_runs_one_configuration_at_a_time_and_reports_invalid_ones(tmp_path):
    two = subprocess.run([sys.executable, str(SCRIPT), str(CONFIGS[0]), str(CONFIGS[1])], check=False,
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert two.returncode == 2 and "run one configuration at a time" in two.stderr
    config = _config("rose_shp_se_hh.json")
    config["method"] = "lesss"
    bad = subprocess.run([sys.executable, str(SCRIPT), str(_write(tmp_path, config)), "--dry-run"], check=False,
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert bad.returncode == 2 and "invalid configuration" in bad.stderr and "unknown method 'lesss'" in bad.stderr
    assert not bad.stdout


def test_run_steps_runs_in_order_and_stops_at_the_first_failure(tmp_path):
    config = _config("raise_llama32_1b_alpaca.json")
    steps = pc.validate(config, "raise.json")
    expanded = pc.expand(config, pc.default_roots(config, tmp_path / "m", tmp_path / "d", tmp_path / "w"))
    calls, lines = [], []

    def runner(argv):
        calls.append(argv)
        return 0 if len(calls) < 3 else 7

    assert pc.run_steps(config, steps, expanded, runner=runner, echo=lines.append) == 7
    assert [c[:2] for c in calls] == [["select", "random"], ["train", "--model"], ["select", "raise"]]
    assert calls[2] == expanded["steps"][2]
    assert "failed with exit code 7" in lines[-1]
    assert (tmp_path / "w" / "runs").is_dir()  # output parents are made before a step runs

    calls.clear()
    assert pc.run_steps(config, steps, expanded, skip_baselines=True, runner=lambda a: calls.append(a) or 0,
                        echo=lines.append) == 0
    assert [c[:2] for c in calls] == [["select", "raise"], ["train", "--model"], ["eval", "--model"],
                                      ["eval", "--model"], ["eval", "--model"]]


def test_skipping_a_baseline_that_a_later_step_needs_is_reported(tmp_path):
    config = _config("less_llama2_7b_tulu.json")
    config["steps"][0]["baseline"] = True  # the random subset the warmup trains on
    steps = pc.validate(config, "less.json")
    expanded = pc.expand(config, pc.default_roots(config, tmp_path / "m", tmp_path / "d", tmp_path / "w"))
    report = pc.path_report(config, steps, expanded, skip_baselines=True)
    assert (1, str(tmp_path / "w" / "random_5pct.jsonl")) in report["unsatisfied"]
    assert not pc.path_report(config, steps, expanded)["unsatisfied"]
