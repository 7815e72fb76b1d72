"""`jraise demo`: every selection method side by side on the built-in testbed, in minutes on a CPU.

It is the selection study (`jraise.study`) at reduced size: a shared base model (the `small`
preset trained briefly from scratch on clean testbed data: the stand-in for a pretrained LLM), a
fresh testbed pool with planted noise, a few-shot validation set of the target categories, then
every method at one budget (static selectors: 5% of the pool; dynamic ones: the same number of
update steps), each followed by the same fine-tune and the same evaluation. Prints the table, a
short verdict and writes ``study.md``, ``study.json`` and ``study.png`` into the output directory.
Re-running resumes: finished methods are read back from ``rows.jsonl``.

``jraise demo --real`` runs the real-model study (`jraise.study_real`) at demo size instead:
SmolLM2-135M-Instruct with LoRA on the real pool, random, LESS, ROSE and RAISE beside the base
model and the oracle.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from jraise.atomic import atomic_write_text
from jraise.study import demo_config, markdown_table, plot_summary, run_study, summarise


def verdict(summary: list[dict], base: dict, score: str = "target_em", loss: str | None = "target_loss",
            label: str = "exact match") -> str:
    """One sentence: which method is best on the target categories, and which beat random (on the
    target loss when the rows have one, else on ``score``)."""
    by_name = {e["method"]: e for e in summary}
    best = max(summary, key=lambda e: (e[score], -e[loss] if loss else 0.0))
    show = (lambda e: f"{e[score]:.2f} / {e[loss]:.3f}") if loss else (lambda e: f"{e[score]:.2f}")
    own = f"{label} {best[score]:.2f}" + (f", target loss {best[loss]:.3f}" if loss else "")
    text = f"best on the target categories: {best['method']} ({own}; base model {show(base)})"
    if "random" in by_name:
        rand = by_name["random"]
        better = [e["method"] for e in summary if e["method"] != "random"
                  and (e[loss] < rand[loss] if loss else e[score] > rand[score])]
        on = "target loss" if loss else label
        text += (f"; random 5% reaches {show(rand)}, and "
                 + (f"{', '.join(better)} beat it on {on}" if better else f"no method beats it on {on}"))
    return text + "."


def run_demo(out: str | Path, seed: int = 0, steps: int | None = None, methods: tuple[str, ...] | None = None,
             echo: Callable[[str], None] = print, real: bool = False, cache: str | Path | None = None,
             **sizes) -> dict:
    """Runs the demo-size study into ``out``; returns {"summary", "base", "rows"}. ``sizes``
    override `demo_config` fields (tests use tiny ones). ``real``: the real-model study at demo
    size instead (`jraise.study_real.real_demo_config`; SmolLM2 and the evaluation data from
    ``cache``, fetched on first use)."""
    out = Path(out)
    start = time.perf_counter()
    overrides = {**sizes, "seeds": (seed,)}
    if steps is not None:
        overrides["steps"] = steps
    if methods is not None:
        overrides["methods"] = tuple(methods)
    if real:
        return _run_real_demo(out, overrides, cache, echo, start)
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


def _run_real_demo(out: Path, overrides: dict, cache, echo, start: float) -> dict:
    from jraise.study_real import RealBench, real_demo_config, run_real_study, write_report

    config = real_demo_config(**overrides)
    echo(f"jraise demo --real: SmolLM2-135M-Instruct + LoRA, {len(config.methods)} methods, targets "
         f"{', '.join(config.targets)}, {config.noise:.0%} planted noise, {config.steps} update steps each")
    result = run_real_study(out, config, cache=cache, echo=echo)
    summary = summarise(result["rows"], tuple(key for key, _, _ in RealBench.columns))
    said = verdict(summary, result["base"], score="target_acc", loss=None, label="accuracy")
    text = write_report(result, config, out / "study", "jraise demo --real", time.perf_counter() - start)
    atomic_write_text(out / "study.md", text + "\nVerdict: " + said + "\n")
    echo("\n" + text + "\nVerdict: " + said)
    echo(f"\nTotal {time.perf_counter() - start:.0f} s. Table, chart and runs in {out}/")
    return {"summary": summary, "base": result["base"], "rows": result["rows"]}
