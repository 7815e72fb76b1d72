"""KV-cache greedy generation equals step-by-step argmax decoding without a cache."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jraise.model import init_model, preset_config
from jraise.model.generate import generate, left_pad

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17], [20]]
# The reference's forward pass, jitted (one compile per sequence length, shared by the tests) rather
# than run op by op, which compiles every operation anew at every length.
_forward = nnx.jit(lambda model, ids, mask: model(ids, mask))


def _reference(model, prompts, steps, eos=()):
    """Greedy decoding by full recomputation: the whole sequence is re-run every step."""
    seqs = [list(p) for p in prompts]
    done = [False] * len(seqs)
    out = [[] for _ in seqs]
    for _ in range(steps):
        ids, mask = left_pad(seqs, 0)
        nxt = np.asarray(jnp.argmax(_forward(model, jnp.asarray(ids), jnp.asarray(mask))[:, -1], -1))
        for r, tok in enumerate(nxt):
            if not done[r]:
                out[r].append(int(tok))
                done[r] = int(tok) in eos
            seqs[r].append(int(tok))
    return out


@pytest.mark.parametrize("preset_overrides", [{}, {"tie_word_embeddings": True, "model_type": "qwen2",
                                                   "attention_bias": True}])
def test_cached_generation_equals_uncached_argmax(preset_overrides):
    model = init_model(preset_config("tiny", vocab_size=40, **preset_overrides), seed=7)
    ids, mask = left_pad(PROMPTS, 0)
    result = generate(model, ids, mask, max_new_tokens=10, eos_token_ids=())
    reference = _reference(model, PROMPTS, 10)
    assert np.asarray(result.tokens).tolist() == reference
    assert np.asarray(result.lengths).tolist() == [10] * len(PROMPTS)


def test_generation_stops_at_eos_and_pads_after():
    model = init_model(preset_config("tiny", vocab_size=40), seed=8)
    ids, mask = left_pad(PROMPTS, 0)
    free = _reference(model, PROMPTS, 12)
    eos = free[0][3]  # a token row 0 emits at step 4: it must stop there
    result = generate(model, ids, mask, max_new_tokens=12, eos_token_ids=(eos,), pad_token_id=0)
    tokens, lengths = np.asarray(result.tokens), np.asarray(result.lengths)
    for r, row in enumerate(free):
        stop = row.index(eos) + 1 if eos in row else 12
        assert lengths[r] == stop
        assert tokens[r, :stop].tolist() == row[:stop]
        assert (tokens[r, stop:] == 0).all()
    assert lengths[0] <= 4


def test_generation_rejects_right_padding():
    model = init_model(preset_config("tiny", vocab_size=40), seed=9)
    ids = np.array([[5, 6, 0]])
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, ids, np.array([[1, 1, 0]]), max_new_tokens=2)
