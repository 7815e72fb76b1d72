"""`jraise demo`: every selection method side by side on the built-in testbed, in minutes on a CPU.

It is the selection study (`jraise.study`) at reduced size: a shared base model (the `small`
preset trained briefly from scratch on clean testbed data: the stand-in for a pretrained LLM), a
fresh testbed pool with planted noise, a few-shot validation set of the target categories, then
every method at one budget (static selectors: 5% of the pool; dynamic ones: the same number of
update steps), each followed by the same fine-tune and the same evaluation. Prints the table, a
short verdict and writes ``study.md``, ``study.json`` and ``study.png`` into the output directory.
Re-running resumes: finished methods are read back from ``rows.jsonl``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from jraise.atomic import atomic_write_text
from jraise.study import demo_config, markdown_table, plot_summary, run_study, summarise


def verdict(summary: list[dict], base: dict) -> str:
    """One sentence: does any selector beat random on the target categories, and which is best."""
    by_name = {e["method"]: e for e in summary}
    best = max(summary, key=lambda e: (e["target_em"], -e["target_loss"]))
    text = (f"best on the target categories: {best['method']} (exact match {best['target_em']:.2f}, "
            f"target loss {best['target_loss']:.3f}; base model {base['target_em']:.2f} / {base['target_loss']:.3f})")
    if "random" in by_name:
        rand = by_name["random"]
        better = [e["method"] for e in summary if e["method"] != "random" and e["target_loss"] < rand["target_loss"]]
        text += (f"; random 5% reaches {rand['target_em']:.2f} / {rand['target_loss']:.3f}, and "
                 + (f"{', '.join(better)} beat it on target loss" if better else "no method beats it on target loss"))
    return text + "."


def run_demo(out: str | Path, seed: int = 0, steps: int | None = None, methods: tuple[str, ...] | None = None,
             echo: Callable[[str], None] = print, **sizes) -> dict:
    """Runs the demo-size study into ``out``; returns {"summary", "base", "rows"}. ``sizes``
    override `demo_config` fields (tests use tiny ones)."""
    out = Path(out)
    start = time.perf_counter()
    overrides = {**sizes, "seeds": (seed,)}
    if steps is not None:
        overrides["steps"] = steps
    if methods is not None:
        overrides["methods"] = tuple(methods)
    config = demo_config(**overrides)
    echo(f"jraise demo: {len(config.methods)} methods, targets {', '.join(config.targets)}, pool {config.n_pool} "
         f"records with {config.noise:.0%} planted noise, {config.steps} update steps each")
    result = run_study(out, config, echo=echo)
    summary = summarise(result["rows"])
    table = markdown_table(summary, result["base"])
    said = verdict(summary, result["base"])
    echo("\n" + table + "\n\nVerdict: " + said)
    atomic_write_text(out / "study.md", table + "\n\nVerdict: " + said + "\n")
    atomic_write_text(out / "study.json", json.dumps({**result, "summary": summary}, indent=2) + "\n")
    plot_summary(summary, out / "study.png")
    echo(f"\nTotal {time.perf_counter() - start:.0f} s. Table, chart and runs in {out}/")
    return {"summary": summary, "base": result["base"], "rows": result["rows"]}
