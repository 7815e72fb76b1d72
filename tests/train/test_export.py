"""Exports of a run: the merged model (`export_model`) and, for LoRA runs, the PEFT adapter."""

import json
import string

import jax.numpy as jnp
import numpy as np
import pytest

from jraise.data.pool import load_pool
from jraise.model import (
    build_char_tokenizer,
    init_model,
    load_model,
    load_tokenizer,
    preset_config,
    save_model,
)
from jraise.model.lora import LoRAConfig, add_lora
from jraise.train import TrainConfig, export_model, train
from jraise.train.loop import ADAPTER_DIR


def test_export_with_a_model_dir_as_tokenizer_keeps_the_new_weights(tmp_path):
    tok = build_char_tokenizer(tmp_path / "base", [string.ascii_lowercase])
    config = preset_config("tiny", vocab_size=len(tok))
    save_model(init_model(config, seed=0), config, tmp_path / "base")  # base dir: weights + tokenizer
    trained = init_model(config, seed=1)  # stands in for a fine-tuned model: other weights
    out = export_model(trained, tmp_path / "final", tokenizer_dir=tmp_path / "base")
    reloaded, _ = load_model(out)
    base, _ = load_model(tmp_path / "base")
    got = np.asarray(reloaded.lm_head.kernel.value)
    assert (out / "tokenizer.json").exists()
    assert np.array_equal(got, np.asarray(trained.lm_head.kernel.value))
    assert not np.array_equal(got, np.asarray(base.lm_head.kernel.value))


# ----------------------------------------------------------------------------------------------
# The trainer's PEFT adapter (RUN_DIR/adapter/) for LoRA runs


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, make_testbed):
    """A testbed pool, and a tiny base model saved as a Hugging Face directory (the `--model`)."""
    root = tmp_path_factory.mktemp("peft_export")
    paths = make_testbed(n_train=16, n_test_per_category=1)
    tok = load_tokenizer(paths["tokenizer"])
    config = preset_config("tiny", vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    save_model(init_model(config, seed=0), config, root / "base")
    return {"pool": load_pool(paths["pool"], tok, max_len=128), "tokenizer": paths["tokenizer"], "base": root / "base"}


RUN = TrainConfig(lr=1e-2, schedule="constant", epochs=1, batch_size=8, max_steps=2, n_buckets=1)


def test_a_lora_run_writes_a_peft_adapter_peft_loads(base_run, tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    model, _ = load_model(base_run["base"])
    add_lora(model, LoRAConfig(rank=2, alpha=6, targets=("q_proj", "v_proj", "up_proj")))
    result = train(model, base_run["pool"], RUN, tmp_path / "run", tokenizer_dir=base_run["tokenizer"],
                   base_model=base_run["base"])

    assert result.adapter_dir == tmp_path / "run" / ADAPTER_DIR
    assert sorted(p.name for p in result.adapter_dir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    settings = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert (settings["r"], settings["lora_alpha"], settings["target_modules"]) == (2, 6, ["q_proj", "v_proj", "up_proj"])
    assert settings["base_model_name_or_path"] == str(base_run["base"].absolute())

    ids = np.random.RandomState(0).randint(0, model.config.vocab_size, (2, 12))
    ours = np.asarray(model(jnp.asarray(ids)))
    base_hf = transformers.AutoModelForCausalLM.from_pretrained(base_run["base"]).eval()
    peft_model = peft.PeftModel.from_pretrained(base_hf, result.adapter_dir).eval()
    with torch.no_grad():
        theirs = peft_model(torch.tensor(ids)).logits.numpy()
    scale = np.abs(ours).max()
    assert np.abs(theirs - ours).max() < 1e-4 * scale
    reloaded, _ = load_model(result.final_dir)  # the merged export agrees too
    assert np.abs(np.asarray(reloaded(jnp.asarray(ids))) - ours).max() < 1e-4 * scale


def test_a_full_fine_tune_writes_no_adapter(base_run, tmp_path):
    model, _ = load_model(base_run["base"])
    result = train(model, base_run["pool"], RUN, tmp_path / "run", base_model=base_run["base"])
    assert result.final_dir is not None and result.adapter_dir is None
    assert not (tmp_path / "run" / ADAPTER_DIR).exists()
