"""PEFT adapters: jraise -> PEFT files -> peft gives jraise's logits, and peft-written adapters -> jraise.

The base is a tiny transformers Llama saved with `save_pretrained`; both sides load it. Adapters
are randomised (PEFT and jraise initialise B = 0, which would make every comparison pass).
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from jraise.eval.metrics import eval_view  # noqa: E402
from jraise.model import load_model  # noqa: E402
from jraise.model import peft as jpeft  # noqa: E402
from jraise.model.lora import LoRAConfig, add_lora, attached_lora_config  # noqa: E402

VOCAB = 67
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL_LINEAR = ATTENTION + ["gate_proj", "up_proj", "down_proj"]
# float32 logits of the two frameworks differ by up to ~2e-5 of the largest logit (measured over
# seeds and target sets); the bound is the one tests/model/test_hf_parity.py uses for base models.
REL_TOL = 1e-4


def _hf_base():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=128)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    _hf_base().save_pretrained(path)
    return path


def _hf_model(base_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()


def _batch(seed=0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, VOCAB, (2, 16))
    mask = np.ones_like(ids)
    mask[1, 11:] = 0  # right padding
    return ids, mask


def _torch_logits(model, ids, mask):
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        out = model(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions))
    return out.logits.float().numpy()


def _jraise_logits(model, ids, mask):
    model = eval_view(model)  # dropout off, as in peft's eval mode
    return np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))


def _rel_err(a, b, mask):
    valid = mask.astype(bool)
    return float(np.abs(a[valid] - b[valid]).max() / np.abs(b[valid]).max())


def _randomise_jraise_adapters(model, seed=0):
    key = jax.random.key(seed)
    for i, (_, var) in enumerate(nnx.iter_graph(model)):
        if isinstance(var, nnx.LoRAParam):
            var.value = 0.3 * jax.random.normal(jax.random.fold_in(key, i), var.shape, var.dtype)


def _lora_state(model):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)))


def _peft_adapter(base_dir, out, **lora_kwargs):
    """An adapter written by peft itself, with random A and B."""
    model = peft.get_peft_model(_hf_model(base_dir), peft.LoraConfig(task_type="CAUSAL_LM", **lora_kwargs))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(0.3 * torch.randn_like(p))
    model.eval().save_pretrained(out)
    return model


# ----------------------------------------------------------------------------------------------
# Parity with peft


@pytest.mark.parametrize("targets", [tuple(ATTENTION), ("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj")])
def test_jraise_adapter_loads_in_peft_with_the_same_logits(base_dir, tmp_path, targets):
    model, _ = load_model(base_dir)
    add_lora(model, LoRAConfig(rank=4, alpha=12, targets=targets))
    _randomise_jraise_adapters(model)
    out = jpeft.save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=base_dir)

    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    settings = json.loads((out / "adapter_config.json").read_text())
    assert settings["r"] == 4 and settings["lora_alpha"] == 12 and settings["task_type"] == "CAUSAL_LM"
    assert settings["target_modules"] == list(targets)
    assert settings["base_model_name_or_path"] == str(base_dir.absolute())

    peft_model = peft.PeftModel.from_pretrained(_hf_model(base_dir), out).eval()
    assert isinstance(peft_model, peft.PeftModelForCausalLM)
    ids, mask = _batch()
    ours = _jraise_logits(model, ids, mask)
    theirs = _torch_logits(peft_model, ids, mask)
    base_only = _torch_logits(_hf_model(base_dir), ids, mask)
    assert _rel_err(base_only, ours, mask) > 1e-2  # the adapters matter
    assert _rel_err(theirs, ours, mask) < REL_TOL


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_written_adapter_loads_in_jraise_with_the_same_logits(base_dir, tmp_path, rslora):
    peft_model = _peft_adapter(base_dir, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=ALL_LINEAR,
                               lora_dropout=0.05, use_rslora=rslora)
    model, _ = load_model(base_dir)
    jpeft.load_peft_adapter(model, tmp_path / "adapter")

    config = attached_lora_config(model)
    assert config.rank == 4 and config.targets == tuple(ALL_LINEAR) and config.dropout == 0.05
    scale = 8 / 2 if rslora else 8 / 4
    assert {n.lora_scale for _, n in jpeft.adaptable_modules(model).items()} == {scale}
    ids, mask = _batch(1)
    assert _rel_err(_jraise_logits(model, ids, mask), _torch_logits(peft_model, ids, mask), mask) < REL_TOL


def test_jraise_save_then_load_gives_identical_adapters(base_dir, tmp_path):
    model, _ = load_model(base_dir)
    add_lora(model, LoRAConfig(rank=3, alpha=5.5, dropout=0.1, targets=("k_proj", "down_proj")))
    _randomise_jraise_adapters(model, seed=4)
    jpeft.save_peft_adapter(model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] is None

    again, _ = load_model(base_dir)
    jpeft.load_peft_adapter(again, tmp_path / "adapter")
    jax.tree.map(np.testing.assert_array_equal, _lora_state(again), _lora_state(model))
    assert attached_lora_config(again) == attached_lora_config(model)
    ids, mask = _batch(2)
    np.testing.assert_array_equal(_jraise_logits(again, ids, mask), _jraise_logits(model, ids, mask))


def test_bfloat16_adapters_round_trip_exactly(base_dir, tmp_path):
    model, _ = load_model(base_dir, dtype="bfloat16")
    add_lora(model, LoRAConfig(rank=2, alpha=4))
    _randomise_jraise_adapters(model, seed=5)
    jpeft.save_peft_adapter(model, tmp_path / "adapter")
    again, _ = load_model(base_dir, dtype="bfloat16")
    jpeft.load_peft_adapter(again, tmp_path / "adapter")
    jax.tree.map(np.testing.assert_array_equal, _lora_state(again), _lora_state(model))


def test_torch_pickled_adapter_is_read(base_dir, tmp_path):
    peft_model = _peft_adapter(base_dir, tmp_path / "adapter", r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    from safetensors.torch import load_file

    adapter = tmp_path / "adapter"
    torch.save(load_file(adapter / "adapter_model.safetensors"), adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    model, _ = load_model(base_dir)
    jpeft.load_peft_adapter(model, adapter)
    ids, mask = _batch(3)
    assert _rel_err(_jraise_logits(model, ids, mask), _torch_logits(peft_model, ids, mask), mask) < REL_TOL


# ----------------------------------------------------------------------------------------------
# Refusals


@pytest.fixture(scope="module")
def valid_adapter(base_dir, tmp_path_factory):
    model, _ = load_model(base_dir)
    add_lora(model, LoRAConfig(rank=4, alpha=8, targets=tuple(ATTENTION)))
    _randomise_jraise_adapters(model, seed=6)
    return jpeft.save_peft_adapter(model, tmp_path_factory.mktemp("valid") / "adapter")


def _copy(valid_adapter, tmp_path):
    return shutil.copytree(valid_adapter, tmp_path / "adapter")


def _edit_config(adapter, **changes):
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _edit_tensors(adapter, change):
    from safetensors.numpy import load_file, save_file

    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def _refused(base_dir, adapter, *needles):
    model, _ = load_model(base_dir)
    with pytest.raises(ValueError) as err:
        jpeft.load_peft_adapter(model, adapter)
    for needle in needles:
        assert needle in str(err.value)
    assert not any(isinstance(v, nnx.LoRAParam) for _, v in nnx.iter_graph(model))  # untouched


@pytest.mark.parametrize("field, value", [
    ("use_dora", True), ("bias", "all"), ("bias", "lora_only"), ("lora_bias", True),
    ("rank_pattern", {"q_proj": 8}), ("alpha_pattern", {"q_proj": 32}), ("modules_to_save", ["lm_head"]),
    ("fan_in_fan_out", True), ("layer_replication", [[0, 2]]), ("trainable_token_indices", [1, 2]),
])
def test_unrepresentable_config_fields_are_refused(base_dir, valid_adapter, tmp_path, field, value):
    adapter = _copy(valid_adapter, tmp_path)
    _edit_config(adapter, **{field: value})
    _refused(base_dir, adapter, "adapter_config.json", repr(field))


@pytest.mark.parametrize("changes, needle", [
    ({"target_modules": ["q_proj", "c_attn"]}, "'target_modules'"),
    ({"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "lm_head"]}, "'target_modules'"),
    ({"peft_type": "IA3"}, "peft_type"),
    ({"task_type": "SEQ_CLS"}, "task_type"),
    ({"r": 0}, "'r'"),
    ({"lora_alpha": "big"}, "'lora_alpha'"),
])
def test_bad_config_values_are_refused(base_dir, valid_adapter, tmp_path, changes, needle):
    adapter = _copy(valid_adapter, tmp_path)
    _edit_config(adapter, **changes)
    _refused(base_dir, adapter, "adapter_config.json", needle)


def _key(layer, proj, which, block="self_attn"):
    return f"base_model.model.model.layers.{layer}.{block}.{proj}.lora_{which}.weight"


def _add_layer_5(t):
    t[_key(5, "q_proj", "A")], t[_key(5, "q_proj", "B")] = t[_key(0, "q_proj", "A")], t[_key(0, "q_proj", "B")]


def _drop_layer_1_v(t):
    del t[_key(1, "v_proj", "A")], t[_key(1, "v_proj", "B")]


def _lm_head(t):
    t["base_model.model.lm_head.lora_A.weight"] = np.zeros((4, 32), np.float32)
    t["base_model.model.lm_head.lora_B.weight"] = np.zeros((VOCAB, 4), np.float32)


def _untargeted_mlp(t):
    t[_key(0, "up_proj", "A", "mlp")] = np.zeros((4, 32), np.float32)
    t[_key(0, "up_proj", "B", "mlp")] = np.zeros((48, 4), np.float32)


def _bias(t):
    t["base_model.model.model.layers.0.self_attn.q_proj.bias"] = np.zeros(32, np.float32)


def _missing_b(t):
    del t[_key(0, "k_proj", "B")]


def _wrong_in(t):
    t[_key(0, "q_proj", "A")] = np.zeros((4, 31), np.float32)


def _wrong_rank(t):
    t[_key(1, "o_proj", "B")] = np.zeros((32, 5), np.float32)


@pytest.mark.parametrize("change, needles", [
    (_add_layer_5, ["layers.5.self_attn.q_proj", "does not have"]),
    (_drop_layer_1_v, ["v_proj is adapted in 1 of 2 layers"]),
    (_lm_head, ["lm_head", "cannot adapt"]),
    (_untargeted_mlp, ["up_proj", "target_modules"]),
    (_bias, ["q_proj.bias", "not a LoRA matrix"]),
    (_missing_b, [_key(0, "k_proj", "B"), "missing"]),
    (_wrong_in, [_key(0, "q_proj", "A"), "(4, 31)", "(4, 32)"]),
    (_wrong_rank, [_key(1, "o_proj", "B"), "(32, 5)", "(32, 4)"]),
])
def test_unrepresentable_tensors_are_refused(base_dir, valid_adapter, tmp_path, change, needles):
    adapter = _copy(valid_adapter, tmp_path)
    _edit_tensors(adapter, change)
    _refused(base_dir, adapter, "adapter_model.safetensors", *needles)


def test_missing_files_and_a_model_with_adapters_are_refused(base_dir, valid_adapter, tmp_path):
    model, _ = load_model(base_dir)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        jpeft.load_peft_adapter(model, tmp_path)
    adapter = _copy(valid_adapter, tmp_path)
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        jpeft.load_peft_adapter(model, adapter)
    add_lora(model, LoRAConfig(rank=2))
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        jpeft.load_peft_adapter(model, valid_adapter)


# ----------------------------------------------------------------------------------------------
# Writing


def test_save_refuses_a_model_without_adapters_and_a_foreign_directory(base_dir, tmp_path):
    model, _ = load_model(base_dir)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        jpeft.save_peft_adapter(model, tmp_path / "a")
    add_lora(model, LoRAConfig(rank=2))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        jpeft.save_peft_adapter(model, tmp_path / "b")
    assert (tmp_path / "b" / "notes.txt").read_text() == "mine"


def test_a_failed_save_leaves_the_earlier_adapter_whole(base_dir, valid_adapter, tmp_path, monkeypatch):
    adapter = _copy(valid_adapter, tmp_path)
    before = {p.name: p.read_bytes() for p in adapter.iterdir()}
    model, _ = load_model(base_dir)
    add_lora(model, LoRAConfig(rank=2, alpha=2, targets=("q_proj",)))
    calls = []

    def fail_on_second(path, data, _real=jpeft.atomic_write_bytes):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return _real(path, data)

    monkeypatch.setattr(jpeft, "atomic_write_bytes", fail_on_second)
    with pytest.raises(OSError, match="disk full"):
        jpeft.save_peft_adapter(model, adapter)
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no staging directory left

    monkeypatch.undo()
    jpeft.save_peft_adapter(model, adapter)  # a later save replaces it
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 2
