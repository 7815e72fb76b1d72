"""SSPL on files: the job behind ``jraise select sspl``.

`run_self_paced` loads a model and a pool from their paths, runs
`jraise.select.self_paced.self_paced_finetune` and writes the fine-tuned model and the indices of
every step's batch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from jraise.atomic import atomic_write_text
from jraise.select.self_paced import self_paced_finetune


def run_self_paced(model_dir: str | os.PathLike, pool_file: str | os.PathLike, out_dir: str | os.PathLike,
                   steps: int, batch_size: int, lr: float, refresh_every: int = 10, n_buckets: int = 4,
                   seed: int = 0, max_len: int = 2048, tokenizer_dir: str | os.PathLike | None = None,
                   echo: Callable[[str], None] | None = print, skip_bad: bool = False, dedupe: bool = False) -> Path:
    """Self-paced fine-tuning of the model in ``model_dir`` on ``pool_file``; writes
    ``out_dir/final`` (HF model with tokenizer files) and ``out_dir/selections.json`` (the pool
    indices of every step, the pool fingerprint and the options). Returns the final model's dir.

    A bad record of the pool is an error naming file, line and field, unless ``skip_bad``: then
    it is dropped, ``echo`` gets a line saying how many, and ``selections.json`` lists them under
    ``"skipped"``; the indices count the kept records."""
    from jraise.data.pool import load_pool, skip_lines, with_skipped
    from jraise.model import load_model, load_tokenizer
    from jraise.model.hf import check_model_inputs
    from jraise.train import export_model

    model_dir, out = Path(model_dir), Path(out_dir)
    tok_dir = Path(tokenizer_dir) if tokenizer_dir is not None else model_dir
    tok = load_tokenizer(tok_dir)
    max_len = check_model_inputs(model_dir, tok, max_len, echo=echo)
    pool = load_pool(pool_file, tok, max_len=max_len, skip_bad=skip_bad, dedupe=dedupe)
    if echo is not None:
        for line in skip_lines(pool, where=out / "selections.json"):
            echo(line)
    model, _ = load_model(model_dir)
    model, indices = self_paced_finetune(model, pool, steps, batch_size, lr, refresh_every=refresh_every,
                                         n_buckets=n_buckets, seed=seed, echo=echo)
    out.mkdir(parents=True, exist_ok=True)
    config = {"steps": steps, "batch_size": batch_size, "lr": lr, "refresh_every": refresh_every,
              "n_buckets": n_buckets, "seed": seed, "max_len": max_len, "model": str(model_dir)}
    record = {"method": "sspl", "pool_fingerprint": pool.fingerprint, "config": config, "indices": indices.tolist()}
    atomic_write_text(out / "selections.json", json.dumps(with_skipped(record, pool)) + "\n")
    return export_model(model, out / "final", tok_dir)
