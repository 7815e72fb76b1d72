"""The baseline selectors on files: the job behind ``jraise select <name>``.

`run_baseline` loads the pool (and the validation file for RDS, the auxiliary model for
perplexity, IFD and RDS) from their paths, runs one selector of `jraise.select.baselines` and
writes the selection files (`jraise.data.selections.write_selection`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

from jraise.data.selections import write_selection
from jraise.select.base import Selection
from jraise.select.baselines import (
    BASELINES,
    NEEDS_MODEL,
    PERPLEXITY_SIDES,
    full_data,
    ifd,
    longest,
    perplexity,
    random_selection,
    rds,
)
from jraise.select.rl.features import start_token_of


def run_baseline(method: str, pool_file: str | os.PathLike, out: str | os.PathLike, *,
                 model_dir: str | os.PathLike | None = None, val_file: str | os.PathLike | None = None,
                 tokenizer_dir: str | os.PathLike | None = None, fraction: float = 0.05, seed: int = 0,
                 which: str = "low", max_len: int = 2048, batch_size: int = 32,
                 drop_above_one: bool = True, skip_bad: bool = False, record_format: str = "chat",
                 echo: Callable[[str], None] | None = print, dedupe: bool = False) -> Selection:
    """Loads the pool (tokenised by ``tokenizer_dir``, else the model's tokenizer), runs ``method``
    and writes ``out`` (selected records), ``out``.scores.npy and ``out``.meta.json.

    A bad record of the pool or the validation file is an error naming file, line and field,
    unless ``skip_bad``: then it is dropped, ``echo`` gets one line per file with skipped records
    and the meta file lists them under ``"skipped"``. The selection's indices count the kept
    records; the records written are the original ones (see `jraise.data.selections.write_selection`)."""
    from jraise.data.pool import load_pool, skip_lines
    from jraise.model import load_model, load_tokenizer
    from jraise.model.hf import check_model_inputs

    if method not in BASELINES:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(BASELINES)}")
    if method in NEEDS_MODEL and model_dir is None:
        raise ValueError(f"{method} needs model_dir (--model DIR): the auxiliary model that scores the pool")
    if method == "rds" and val_file is None:
        raise ValueError("rds needs val_file (--val FILE): the validation records the pool is compared to")
    if tokenizer_dir is None and model_dir is None:
        raise ValueError(f"{method} needs tokenizer_dir (--tokenizer DIR) or model_dir (--model DIR) to "
                         "tokenise the pool")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 < fraction <= 1:  # checked here too, before the model pass rather than after it
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if method == "perplexity" and which not in PERPLEXITY_SIDES:
        raise ValueError(f"which (--which) must be 'low' or 'high', got {which!r}")
    tok = load_tokenizer(Path(tokenizer_dir if tokenizer_dir is not None else model_dir))
    if model_dir is not None:
        max_len = check_model_inputs(model_dir, tok, max_len, echo=echo)
    pool = load_pool(pool_file, tok, max_len=max_len, skip_bad=skip_bad, record_format=record_format, dedupe=dedupe)
    val_pool = (load_pool(val_file, tok, max_len=max_len, skip_bad=skip_bad, record_format=record_format, dedupe=dedupe,
                          side="validation") if method == "rds" else None)
    if echo is not None:
        for line in skip_lines(pool, val_pool, where=Path(str(out) + ".meta.json")):
            echo(line)
    model = load_model(model_dir)[0] if method in NEEDS_MODEL else None
    if method == "random":
        selection = random_selection(pool, fraction, seed)
    elif method == "full":
        selection = full_data(pool)
    elif method == "longest":
        selection = longest(pool, fraction)
    elif method == "perplexity":
        selection = perplexity(model, pool, fraction, which, start_token_of(tok), batch_size)
    elif method == "ifd":
        selection = ifd(model, pool, fraction, start_token_of(tok), batch_size, drop_above_one)
    else:
        selection = rds(model, pool, val_pool, fraction, batch_size)
    if method in NEEDS_MODEL:
        selection = dataclasses.replace(selection, config={**selection.config, "model": str(model_dir)})
    if record_format != "chat":
        selection = dataclasses.replace(selection, config={**selection.config, "record_format": record_format})
    write_selection(selection, pool, out, inputs=(val_pool,))
    return selection
