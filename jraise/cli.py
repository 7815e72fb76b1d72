"""The `jraise` command line. Each command is a thin shell over a library function."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="jraise: choose the instruction data an LLM is fine-tuned on (JAX/Flax).")


@app.command("init-model")
def init_model_cmd(
    out_dir: Path = typer.Argument(..., help="Directory to write the HF-format model into."),
    preset: str = typer.Option("tiny", help="Model size preset: tiny, small or base."),
    tokenizer: Path = typer.Option(..., help="HF tokenizer directory; its vocabulary sizes the model."),
    seed: int = typer.Option(0, help="Initialisation seed."),
    model_type: str = typer.Option("llama", help="llama, mistral or qwen2 (sets config.json's model_type)."),
    tie_embeddings: bool = typer.Option(False, help="Tie input embeddings and LM head."),
):
    """Write a randomly initialised model directory: config.json, safetensors and tokenizer files."""
    from jraise.model import init_model, load_tokenizer, preset_config, save_model

    tok = load_tokenizer(tokenizer)
    config = preset_config(preset, vocab_size=len(tok), model_type=model_type,
                           tie_word_embeddings=tie_embeddings, attention_bias=model_type == "qwen2",
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
    save_model(init_model(config, seed=seed), config, out_dir)
    tok.save_pretrained(str(out_dir))
    typer.echo(f"wrote {preset} {model_type} model ({config.num_hidden_layers} layers, "
               f"vocab {config.vocab_size}) to {out_dir}")


@app.command("testbed")
def testbed_cmd(
    out_dir: Path = typer.Argument(..., help="Directory for pool/val/val_pref/test JSONL and the tokenizer."),
    n_train: int = typer.Option(2000, help="Pool size."),
    noise: float = typer.Option(0.0, help="Fraction of pool records with corrupted responses."),
    seed: int = typer.Option(0, help="Generator seed."),
    n_val: int = typer.Option(8, help="Few-shot validation records per category."),
    n_test: int = typer.Option(50, help="Test records per category."),
    categories: Optional[str] = typer.Option(None, help="Comma-separated subset of categories."),
):
    """Write the built-in synthetic testbed (known categories, planted noise)."""
    from jraise.data.testbed import write_testbed

    cats = [c.strip() for c in categories.split(",")] if categories else None
    paths = write_testbed(out_dir, n_train=n_train, noise=noise, seed=seed, n_val_per_category=n_val,
                          n_test_per_category=n_test, categories=cats)
    typer.echo(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))


def main():  # console-script entry point
    app()


if __name__ == "__main__":
    main()
