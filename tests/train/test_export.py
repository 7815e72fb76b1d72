"""export_model: the exported weights are the model's, even when the tokenizer comes from a model dir."""

import string

import numpy as np

from jraise.model import (
    build_char_tokenizer,
    init_model,
    load_model,
    preset_config,
    save_model,
)
from jraise.train import export_model


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
