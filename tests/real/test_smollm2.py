"""SmolLM2-135M-Instruct (the real model, from the cache): jraise against transformers."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jraise.model.generate import generate, left_pad  # noqa: E402

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."},
     {"role": "user", "content": "Name a colour of the sky on a clear day."}],
    [{"role": "user", "content": "Write the numbers 1234 and 56.78 in words."}],
    [{"role": "user", "content": "Reverse the word.\n\nabc"}, {"role": "assistant", "content": "cba"},
     {"role": "user", "content": "Now reverse: héllo wörld"}],
]
# Measured float32 -> bfloat16 weight-and-compute error of SmolLM2's logits (BUILD_NOTES.md).
BF16_MAX_REL_ERROR = 0.05
BF16_MIN_ARGMAX_AGREEMENT = 0.95


def _prompts(tok):
    return [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in CONVERSATIONS]


def _ids(tok):
    return [tok(p, add_special_tokens=False).input_ids for p in _prompts(tok)]


def _right_pad(seqs, pad_id):
    width = max(map(len, seqs))
    ids = np.full((len(seqs), width), pad_id, np.int32)
    mask = np.zeros((len(seqs), width), np.int32)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    return ids, mask


def _hf_logits(hf_model, seq):
    with torch.no_grad():
        return hf_model(torch.tensor([seq])).logits[0].numpy()


def test_chat_template_renders_as_transformers_gguf_tokenizer(smollm2, smollm2_gguf):
    _, tok = smollm2
    ref = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    for conv in CONVERSATIONS:
        for gen in (True, False):
            if not gen and conv[-1]["role"] != "assistant":
                conv = [*conv, {"role": "assistant", "content": "Paris."}]
            ours = tok.apply_chat_template(conv, add_generation_prompt=gen, tokenize=False)
            assert ours == ref.apply_chat_template(conv, add_generation_prompt=gen, tokenize=False)
            assert tok(ours, add_special_tokens=False).input_ids == ref(ours, add_special_tokens=False).input_ids
    assert "<|im_start|>assistant\n" in ours


def test_float32_logits_match_transformers_on_a_padded_batch(smollm2, hf_smollm2):
    model, tok = smollm2
    seqs = _ids(tok)
    ids, mask = _right_pad(seqs, tok.pad_token_id)
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    for i, seq in enumerate(seqs):
        ref = _hf_logits(hf_smollm2, seq)
        got = ours[i, : len(seq)]
        rel = np.abs(got - ref).max() / np.abs(ref).max()
        assert rel < 1e-4, (i, rel)
        assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.99


def test_greedy_generation_matches_transformers(smollm2, hf_smollm2):
    model, tok = smollm2
    seqs = _ids(tok)
    ids, mask = left_pad(seqs, pad_id=tok.pad_token_id)
    out = generate(model, ids, mask, max_new_tokens=32)
    eos = set(model.config.eos_token_ids)
    for i, seq in enumerate(seqs):
        with torch.no_grad():
            ref = hf_smollm2.generate(torch.tensor([seq]), attention_mask=torch.ones(1, len(seq), dtype=torch.long),
                                      max_new_tokens=32, do_sample=False, eos_token_id=sorted(eos),
                                      pad_token_id=tok.pad_token_id)[0, len(seq):].tolist()
        ours = np.asarray(out.tokens[i, : int(out.lengths[i])]).tolist()
        assert ours == ref, (i, tok.decode(ours), tok.decode(ref))
    assert max(int(n) for n in out.lengths) > 4  # real answers, not an immediate EOS


def test_bfloat16_logits_within_the_measured_tolerance(smollm2, smollm2_dir):
    from jraise.model import load_model

    model32, tok = smollm2
    model16, _ = load_model(smollm2_dir, dtype=jnp.bfloat16)
    ids, mask = _right_pad(_ids(tok), tok.pad_token_id)
    a = np.asarray(model32(jnp.asarray(ids), jnp.asarray(mask)), np.float32)
    b = np.asarray(model16(jnp.asarray(ids), jnp.asarray(mask)), np.float32)
    valid = mask.astype(bool)
    rel = np.abs(a - b)[valid].max() / np.abs(a)[valid].max()
    agree = (a.argmax(-1) == b.argmax(-1))[valid].mean()
    assert rel < BF16_MAX_REL_ERROR and agree >= BF16_MIN_ARGMAX_AGREEMENT, (rel, agree)


def _records(eval_data_dir, name, n):
    with open(eval_data_dir / f"{name}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


def _response_loss(model, tok, records):
    from jraise.eval import evaluate

    return evaluate(model, tok, records, kinds=["loss"], batch_size=4, max_len=256)["loss"]["overall"]["per_token"]


def test_lora_steps_lower_the_loss_and_the_adapter_loads_in_peft(smollm2, smollm2_dir, eval_data_dir, tmp_path):
    """6 LoRA steps on real records lower their response loss; the run's PEFT adapter gives the trained
    model's logits in peft (on transformers' base model) and when read back into jraise. (6 steps, not
    20: the training loss is about a third of its start after 4 steps, and each step costs seconds.)"""
    peft = pytest.importorskip("peft")
    from jraise.data.pool import load_pool
    from jraise.eval.metrics import eval_view
    from jraise.model import load_model, load_peft_adapter
    from jraise.model.lora import LoRAConfig, add_lora
    from jraise.train import TrainConfig, train

    _, tok = smollm2
    records = [{k: r[k] for k in ("id", "category", "instruction", "output")}  # SFT records: no options
               for r in _records(eval_data_dir, "commonsenseqa", 16)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    model, _ = load_model(smollm2_dir)
    before = _response_loss(model, tok, records)
    add_lora(model, LoRAConfig(rank=8, alpha=16), seed=0)
    pool = load_pool(data, tok, max_len=256)
    result = train(model, pool, TrainConfig(lr=2e-3, batch_size=4, epochs=5, max_steps=6, n_buckets=1),
                   tmp_path / "run", base_model=smollm2_dir)
    assert result.steps == 6 and result.adapter_dir is not None
    after = _response_loss(model, tok, records)
    assert after < 0.9 * before, (before, after)

    seqs = _ids(tok)
    ids, mask = _right_pad(seqs, tok.pad_token_id)
    ours = np.asarray(eval_view(model)(jnp.asarray(ids), jnp.asarray(mask)))
    base = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(base, str(result.adapter_dir)).eval()
    for i, seq in enumerate(seqs):
        ref = _hf_logits(peft_model, seq)
        assert np.abs(ours[i, : len(seq)] - ref).max() / np.abs(ref).max() < 1e-4

    reread = load_peft_adapter(load_model(smollm2_dir)[0], result.adapter_dir)
    again = np.asarray(eval_view(reread)(jnp.asarray(ids), jnp.asarray(mask)))
    valid = mask.astype(bool)
    assert np.abs(again - ours)[valid].max() / np.abs(ours)[valid].max() < 1e-5
