"""Few-shot preference pairs on files: the job behind ``jraise pairs``.

`write_model_answer_pairs` loads a model and validation records from their paths, makes the
pairs with `jraise.select.preference_pairs.model_answer_pairs` and writes them with a report.
"""

from __future__ import annotations

import os
from pathlib import Path

from jraise.eval import normalise
from jraise.eval.report import default_max_len, load_eval_records
from jraise.select.preference_pairs import model_answer_pairs


def write_model_answer_pairs(model_dir: str | os.PathLike, val_file: str | os.PathLike, out: str | os.PathLike, *,
                             max_new_tokens: int = 32, batch_size: int = 16,
                             normaliser: normalise.Normaliser = "testbed", tokenizer_dir: str | os.PathLike | None = None,
                             max_len: int | None = None, skip_bad: bool = False) -> dict:
    """`model_answer_pairs` for the records of ``val_file`` (any format `jraise.data.formats` reads)
    with the model of ``model_dir``: the pairs go to ``out`` (JSONL) and the report, with the model
    directory, to ``out + ".meta.json"``, as one commit (`jraise.atomic.atomic_write_group`: both
    written before either is renamed into place, the meta file first). ``max_len`` None is
    `jraise.eval.report.default_max_len` (2048, or the model's context when shorter)."""
    import json

    from jraise.atomic import atomic_write_group
    from jraise.model import load_model, load_tokenizer
    from jraise.model.hf import check_tokenizer_fits

    model, _ = load_model(model_dir)
    tokenizer = load_tokenizer(tokenizer_dir if tokenizer_dir is not None else model_dir)
    check_tokenizer_fits(tokenizer, model.config, model_dir)
    pairs, report = model_answer_pairs(model, tokenizer, load_eval_records(val_file), max_new_tokens=max_new_tokens,
                                       batch_size=batch_size, normaliser=normaliser, source=str(val_file),
                                       max_len=default_max_len(model) if max_len is None else max_len,
                                       skip_bad=skip_bad)
    out = Path(out)
    report = {"kind": "model_answer_pairs", "model": str(model_dir), **report}
    text = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)
    atomic_write_group([(out.with_name(out.name + ".meta.json"), (json.dumps(report, indent=2) + "\n").encode()),
                        (out, text.encode("utf-8"))])
    return report
