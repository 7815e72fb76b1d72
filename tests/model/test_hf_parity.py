"""Parity with transformers' PyTorch models (llama, mistral, qwen2, qwen3): load HF checkpoints,
save ones HF loads back, and decode greedily to the same tokens."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jraise.model import load_model, save_model  # noqa: E402
from jraise.model.generate import generate, left_pad  # noqa: E402

VOCAB = 101


def _llama():
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
        rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    return transformers.LlamaForCausalLM(cfg)


def _mistral():
    cfg = transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=8, max_position_embeddings=256,
        sliding_window=None)
    return transformers.MistralForCausalLM(cfg)


def _qwen2():
    cfg = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, use_sliding_window=False)
    return transformers.Qwen2ForCausalLM(cfg)


def _qwen3(tie_word_embeddings=False, attention_bias=False):
    # head_dim * heads (64) != hidden (32): q_proj widens, o_proj narrows.
    cfg = transformers.Qwen3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        rope_theta=1000000.0, tie_word_embeddings=tie_word_embeddings, attention_bias=attention_bias,
        use_sliding_window=False)
    return transformers.Qwen3ForCausalLM(cfg)


def _qwen3_tied_with_bias():
    return _qwen3(tie_word_embeddings=True, attention_bias=True)


BUILDERS = {"llama": _llama, "mistral": _mistral, "qwen2": _qwen2, "qwen3": _qwen3,
            "qwen3_tied_with_bias": _qwen3_tied_with_bias}


def _randomise_biases(model):
    # HF initialises biases to zero and norms to one; random ones make the bias and norm parity
    # checks meaningful (Qwen3's per-head q_norm / k_norm included).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def hf_checkpoint(request, tmp_path_factory):
    torch.manual_seed(0)
    model = BUILDERS[request.param]().eval()
    _randomise_biases(model)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, model, path


def _padded_batch(seed=0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, VOCAB, (3, 24))
    mask = np.ones_like(ids)
    mask[1, 17:] = 0  # right padding
    mask[2, 9:] = 0
    return ids, mask


def _hf_logits(model, ids, mask):
    # Explicit position ids, as jraise derives them from the mask (identical for right padding).
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        out = model(torch.tensor(ids), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions))
    return out.logits.float().numpy()


def _rel_err(a, b, mask):
    valid = mask.astype(bool)
    return float(np.abs(a[valid] - b[valid]).max() / np.abs(b[valid]).max())


def test_load_model_matches_transformers_logits(hf_checkpoint):
    _, hf_model, path = hf_checkpoint
    model, config = load_model(path)
    assert config.model_type == hf_model.config.model_type
    ids, mask = _padded_batch()
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    assert ours.shape == (3, 24, VOCAB)
    assert _rel_err(ours, _hf_logits(hf_model, ids, mask), mask) < 1e-4


def test_left_padding_gives_the_unpadded_logits(hf_checkpoint):
    _, _, path = hf_checkpoint
    model, _ = load_model(path)
    ids, _ = _padded_batch(1)
    row = ids[0, :10]
    padded = np.concatenate([np.zeros(6, int), row])[None]
    mask = np.concatenate([np.zeros(6, int), np.ones(10, int)])[None]
    alone = np.asarray(model(jnp.asarray(row[None])))
    with_pad = np.asarray(model(jnp.asarray(padded), jnp.asarray(mask)))
    np.testing.assert_allclose(with_pad[0, 6:], alone[0], rtol=1e-4, atol=1e-5)


def test_save_model_reloads_in_transformers(hf_checkpoint, tmp_path):
    _, hf_model, path = hf_checkpoint
    model, config = load_model(path)
    save_model(model, config, tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(reloaded).__name__ == type(hf_model).__name__
    ids, mask = _padded_batch(2)
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    assert _rel_err(_hf_logits(reloaded, ids, mask), ours, mask) < 1e-4
    # Round trip through jraise too: identical weights.
    again, _ = load_model(tmp_path / "out")
    np.testing.assert_array_equal(np.asarray(again(jnp.asarray(ids), jnp.asarray(mask))), ours)


def test_sharded_checkpoint_loads_identically(hf_checkpoint, tmp_path):
    _, hf_model, path = hf_checkpoint
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    whole, _ = load_model(path)
    sharded, config = load_model(tmp_path / "sharded")
    ids, mask = _padded_batch(3)
    np.testing.assert_array_equal(np.asarray(whole(jnp.asarray(ids), jnp.asarray(mask))),
                                  np.asarray(sharded(jnp.asarray(ids), jnp.asarray(mask))))
    # jraise's own sharded writer, read back by transformers.
    save_model(sharded, config, tmp_path / "ours_sharded", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "ours_sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "ours_sharded" / "model.safetensors").exists()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours_sharded").eval()
    assert _rel_err(_hf_logits(reloaded, ids, mask), np.asarray(sharded(jnp.asarray(ids), jnp.asarray(mask))),
                    mask) < 1e-4


def test_bfloat16_load_is_close_to_float32(hf_checkpoint):
    _, _, path = hf_checkpoint
    m32, _ = load_model(path)
    m16, c16 = load_model(path, dtype="bfloat16")
    assert m16.layers[0].self_attn.q_proj.kernel.dtype == jnp.bfloat16
    ids, mask = _padded_batch(4)
    a = np.asarray(m32(jnp.asarray(ids), jnp.asarray(mask)))
    b = np.asarray(m16(jnp.asarray(ids), jnp.asarray(mask)))
    assert b.dtype == np.float32 and np.isfinite(b).all()
    assert _rel_err(b, a, mask) < 5e-2


def test_greedy_generation_matches_transformers(hf_checkpoint):
    _, hf_model, path = hf_checkpoint
    model, _ = load_model(path)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]
    ids, mask = left_pad(prompts, pad_id=0)
    ours = np.asarray(generate(model, ids, mask, max_new_tokens=8, eos_token_ids=()).tokens)
    with torch.no_grad():
        theirs = hf_model.generate(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                                   max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0,
                                   eos_token_id=None)
    np.testing.assert_array_equal(ours, theirs[:, ids.shape[1]:].numpy())


def test_qwen3_checkpoint_has_per_head_query_and_key_norms(tmp_path):
    torch.manual_seed(1)
    hf_model = _qwen3().eval()
    _randomise_biases(hf_model)
    hf_model.save_pretrained(tmp_path)
    model, config = load_model(tmp_path)
    assert config.head_dim * config.num_attention_heads != config.hidden_size
    attn = model.layers[1].self_attn
    assert attn.q_norm.weight.shape == attn.k_norm.weight.shape == (config.head_dim,)
    assert attn.q_proj.bias is None and attn.o_proj.bias is None
    np.testing.assert_array_equal(np.asarray(attn.k_norm.weight[...]),
                                  hf_model.model.layers[1].self_attn.k_norm.weight.detach().numpy())
