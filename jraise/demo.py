"""`jraise demo`: the foundation demo on the built-in testbed.

testbed (clean pool, and the same pool with 50% planted noise) -> a `small` model initialised from
the testbed tokenizer -> two fine-tunes with identical settings and step counts -> test exact match
and response loss per category for the untrained model and both fine-tunes, as a table.

It shows the substrate every selection method stands on, and the gap selection has to close: what
noisy data costs. The method comparison (issue 7) will extend it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from jraise.data.pool import load_pool
from jraise.data.testbed import write_testbed
from jraise.eval import evaluate
from jraise.model import init_model, load_tokenizer, preset_config, save_model
from jraise.train import TrainConfig, train

DEMO_LR = 1e-3  # from scratch: far above a fine-tune's rate; 3e-3 stalls on the plateau (BUILD_NOTES)
DEMO_BATCH = 16
DEMO_MAX_LEN = 192


def _table(rows: dict[str, dict], categories: list[str]) -> str:
    names = list(rows)
    head = "| category | " + " | ".join(names) + " |"
    lines = [head, "|---" * (len(names) + 1) + "|"]
    for cat in categories:
        cells = [f"{rows[n]['exact_match']['per_category'][cat]['accuracy']:.2f}" for n in names]
        lines.append(f"| {cat} | " + " | ".join(cells) + " |")
    overall = [f"**{rows[n]['exact_match']['overall']['accuracy']:.2f}**" for n in names]
    lines.append("| **all (exact match)** | " + " | ".join(overall) + " |")
    loss = [f"{rows[n]['loss']['overall']['per_token']:.3f}" for n in names]
    lines.append("| response loss / token | " + " | ".join(loss) + " |")
    return "\n".join(lines)


def run_demo(out: str | Path, n_train: int = 1200, steps: int = 300, seed: int = 0,
             echo: Callable[[str], None] = print) -> dict:
    """Runs the demo into `out` and returns {model name: evaluation report}."""
    out = Path(out)
    start = time.perf_counter()
    clean = write_testbed(out / "testbed_clean", n_train=n_train, noise=0.0, seed=seed, n_test_per_category=20)
    noisy = write_testbed(out / "testbed_noisy", n_train=n_train, noise=0.5, seed=seed, n_test_per_category=20)
    tok_dir = clean["tokenizer"]
    tok = load_tokenizer(tok_dir)
    config = preset_config("small", vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    save_model(init_model(config, seed=seed), config, out / "model_init")
    echo(f"testbed written ({n_train} pool records, 14 categories); small model initialised")

    reports = {}
    test_file = clean["test"]
    base = init_model(config, seed=seed)
    reports["untrained"] = evaluate(base, tok, test_file, max_new_tokens=12, out_path=out / "eval_untrained.json")
    train_config = TrainConfig(lr=DEMO_LR, schedule="cosine", warmup_ratio=0.05, epochs=1000, max_steps=steps,
                               batch_size=DEMO_BATCH, seed=seed, max_grad_norm=1.0)
    for name, paths in (("clean pool", clean), ("50% noise pool", noisy)):
        pool = load_pool(paths["pool"], tok, max_len=DEMO_MAX_LEN)
        model = init_model(config, seed=seed)
        t0 = time.perf_counter()
        train(model, pool, train_config, out / f"run_{name.split()[0]}", resume=True, tokenizer_dir=tok_dir)
        echo(f"fine-tuned on the {name}: {steps} steps in {time.perf_counter() - t0:.0f} s")
        reports[name] = evaluate(model, tok, test_file, max_new_tokens=12,
                                 out_path=out / f"eval_{name.split()[0]}.json")

    categories = sorted(reports["untrained"]["exact_match"]["per_category"])
    echo("\nTest exact match per category (built-in testbed, small preset):\n")
    echo(_table(reports, categories))
    em = {k: v["exact_match"]["overall"]["accuracy"] for k, v in reports.items()}
    verdict = ("noisy data costs accuracy: the clean run beats the 50%-noise run"
               if em["clean pool"] > em["50% noise pool"] else
               "no gap between clean and noisy training at this size: train longer (--steps)")
    echo(f"\nVerdict: {verdict} ({em['clean pool']:.2f} vs {em['50% noise pool']:.2f}; untrained "
         f"{em['untrained']:.2f}). Total {time.perf_counter() - start:.0f} s. Files in {out}/")
    return reports
