"""Paper configurations: published fine-tuning set-ups as checked sequences of `jraise` commands.

A configuration (one JSON file; the shipped ones are in ``benchmarks/configs/``) names a
published set-up and the `jraise` command lines that reproduce it:

    name, paper {title, arxiv, venue}, method (raise | less | rose | beyond_iid), notes [...],
    model {path, hf_config {vocab_size, hidden_size, intermediate_size, num_hidden_layers,
           num_attention_heads, num_key_value_heads, tie_word_embeddings[, head_dim,
           model_type, attention_bias, mlp_bias]}},
    data {KEY: {path, records, description[, categories]}},
    budget {data, fraction, epochs, batch_size}   (optional: a RAISE-style step budget),
    steps [{name, run: [jraise arguments...][, baseline: true][, note]}].

Placeholders: ``${MODELS}``, ``${DATA}`` and ``${WORK}`` (roots: the ``models``/``data``/
``work`` arguments, else the environment variables ``JRAISE_MODELS``/``JRAISE_DATA``/
``JRAISE_WORK``, else ``models``, ``data`` and ``paper_runs/<name>``), ``${MODEL}`` (the model
path) and ``${data.KEY}`` (a data entry's path).

`load_config` reads a file; `validate` checks every step against the real `jraise` command line
(the typer app of `jraise.cli`: the sub-command must exist, every option must be one of its
options, values must parse and required options must be present) and raises `ConfigError`
naming the file, the step and the option; `expand` fills in the placeholders; `path_report`
says which referenced local paths exist; `plan` / `format_plan` give per step the records it
reads, its optimizer steps, the parameter count, the weights, the trainable state (float32
master copy, gradient and Adam moments), the LESS/ROSE gradient-feature store and a rough upper
bound of the activations, without weights or data; `run_steps` runs the steps in order
(``python -m jraise.cli ...``) and stops at the first failure. `run_configs` is all of it for a
list of files: a dry run prints the plans, a real run first checks that every input that no
earlier step writes exists (``benchmarks/paper_configs.py`` is its command line).

Memory figures are estimates from the architecture numbers, not measurements: weights in the
dtype jraise loads them in (float32 unless the step says ``--dtype bfloat16``; the bf16 figure
is in the plan too), trainable state = 16 bytes per trainable parameter (jraise keeps a float32
master copy of the trainable leaves, a float32 gradient and Adam's two float32 moments), the
feature store = N x d x 2 bytes (float16) per checkpoint. Activations: every sequence at the
step's ``--max-len``, no rematerialisation, einsum attention keeping one float32 [heads, L, L]
matrix per layer, and float32 logits; real batches are bucketed to their longest record, so
this is an upper bound.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

METHODS = ("raise", "less", "rose", "beyond_iid")
# The jraise commands that make up each method: a configuration must run at least one of them.
METHOD_COMMANDS = {"raise": ("select raise",), "less": ("select less",), "rose": ("select rose",),
                   "beyond_iid": ("interactions", "select mixture", "curriculum")}
TOP_KEYS = ("name", "paper", "method", "model", "data", "steps")
HF_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "tie_word_embeddings")
ROOTS = ("MODELS", "DATA", "WORK")
PLACEHOLDER = re.compile(r"\$\{([^}]*)\}")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
OUTPUT_PARAMS = ("out", "out_dir", "work_dir")  # path options a command writes
FEATURE_CHUNK = 8  # examples per per-example-gradient program in `select less|rose` (not a CLI option)
DEFAULT_SEQ = 2048  # sequence length of commands without --max-len (eval)
GIB = 1024 ** 3


class ConfigError(ValueError):
    """A configuration problem; the message names the file (and the step and option)."""


# ---------------------------------------------------------------------------------------------
# Architecture arithmetic
# ---------------------------------------------------------------------------------------------

def _dims(hf: dict) -> dict:
    h, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    head_dim = int(hf.get("head_dim") or h // heads)
    return {"V": int(hf["vocab_size"]), "H": h, "I": int(hf["intermediate_size"]), "L": int(hf["num_hidden_layers"]),
            "q": heads * head_dim, "kv": int(hf["num_key_value_heads"]) * head_dim, "heads": heads}


def parameter_count(hf_config: dict) -> int:
    """Parameters of a Llama-family decoder from its Hugging Face config numbers: embeddings,
    attention with grouped K/V heads (and biases where the family has them), the SwiGLU MLP, two
    RMSNorms per layer, the final norm, and the LM head unless tied to the embeddings."""
    d = _dims(hf_config)
    H, inner = d["H"], d["I"]
    model_type = hf_config.get("model_type", "llama")
    qkv_bias = model_type == "qwen2" or bool(hf_config.get("attention_bias", False))
    o_bias = model_type == "llama" and bool(hf_config.get("attention_bias", False))
    mlp_bias = model_type == "llama" and bool(hf_config.get("mlp_bias", False))
    attention = H * d["q"] + 2 * H * d["kv"] + d["q"] * H
    if qkv_bias:
        attention += d["q"] + 2 * d["kv"]
    if o_bias:
        attention += H
    mlp = 3 * H * inner + ((2 * inner + H) if mlp_bias else 0)
    per_layer = attention + mlp + 2 * H
    head = 0 if hf_config.get("tie_word_embeddings", False) else d["V"] * H
    return d["V"] * H + d["L"] * per_layer + H + head


def _projection_shapes(hf: dict) -> dict:
    d = _dims(hf)
    return {"q_proj": (d["H"], d["q"]), "k_proj": (d["H"], d["kv"]), "v_proj": (d["H"], d["kv"]),
            "o_proj": (d["q"], d["H"]), "gate_proj": (d["H"], d["I"]), "up_proj": (d["H"], d["I"]),
            "down_proj": (d["I"], d["H"])}


def lora_parameter_count(hf_config: dict, rank: int, targets=ATTENTION) -> int:
    """LoRA adapter parameters: rank x (fan_in + fan_out) per adapted projection and layer
    (A is [in, r], B is [r, out]). ``targets``: projection names, with or without ``_proj``."""
    shapes = _projection_shapes(hf_config)
    total = 0
    for target in targets:
        name = target if target.endswith("_proj") else f"{target}_proj"
        if name not in shapes:
            raise ValueError(f"unknown LoRA target {target!r}; choose from {', '.join(shapes)}")
        fan_in, fan_out = shapes[name]
        total += rank * (fan_in + fan_out)
    return total * int(hf_config["num_hidden_layers"])


def activation_bytes(hf_config: dict, sequences: int, seq_len: int, dtype_bytes: int, backward: bool = True) -> int:
    """A rough upper bound of activation memory for ``sequences`` rows of ``seq_len`` tokens.

    Backward: per token and layer the saved inputs of the norms, q/k/v/o and the MLP
    (4H + 2q + 2kv + 4I values in the compute dtype) plus one float32 attention-probability row
    [heads, seq_len]; float32 logits and their gradient. Forward only: one layer's transient
    values and the logits."""
    d = _dims(hf_config)
    per_token_layer = dtype_bytes * (4 * d["H"] + 2 * d["q"] + 2 * d["kv"] + 4 * d["I"]) + 4 * d["heads"] * seq_len
    tokens = sequences * seq_len
    if backward:
        return tokens * (d["L"] * per_token_layer + 2 * 4 * d["V"])
    return tokens * (per_token_layer + 4 * d["V"])


# ---------------------------------------------------------------------------------------------
# Loading and validation
# ---------------------------------------------------------------------------------------------

def load_config(path) -> dict:
    """The JSON configuration at ``path`` (errors name the file, line and column)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the configuration ({err.strerror or err})") from err
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from err
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    return config


_CLI_ROOT = None


def cli_root():
    """The click command tree of the `jraise` typer app (built once)."""
    global _CLI_ROOT
    if _CLI_ROOT is None:
        import typer

        from jraise.cli import app

        _CLI_ROOT = typer.main.get_command(app)
    return _CLI_ROOT


def resolve_command(tokens: list[str]):
    """(command object, its words e.g. ['select', 'less'], the remaining arguments)."""
    node, words = cli_root(), []
    rest = list(tokens)
    while hasattr(node, "commands"):
        if not rest:
            raise LookupError(f"'jraise {' '.join(words)}' needs a sub-command: {', '.join(sorted(node.commands))}")
        word = rest.pop(0)
        if word not in node.commands:
            where = f"jraise {' '.join(words)}".strip()
            close = difflib.get_close_matches(word, list(node.commands), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            known = ", ".join(sorted(node.commands))
            raise LookupError(f"unknown sub-command {word!r} of '{where}'{hint}; known: {known}")
        node = node.commands[word]
        words.append(word)
    return node, words, rest


def _option_table(command) -> dict:
    """{'--opt': takes_a_value} over the command's options (both sides of --x/--no-x flags)."""
    table = {}
    for param in command.params:
        if getattr(param, "param_type_name", "") != "option":
            continue
        for opt in list(param.opts) + list(param.secondary_opts):
            table[opt] = not param.is_flag
    return table


def _error_text(err: Exception) -> str:
    return err.format_message() if hasattr(err, "format_message") else str(err)


def parse_step(tokens: list[str]):
    """Checks one step's argument list against the jraise CLI. Returns (words, params) where
    params are the command's parsed values (defaults filled in). Raises LookupError (unknown
    sub-command) or ValueError (unknown option, bad value, missing required option)."""
    command, words, args = resolve_command(tokens)
    options = _option_table(command)
    i = 0
    while i < len(args):
        token = args[i]
        if token == "--":
            break
        if token.startswith("-") and len(token) > 1 and not _is_number(token):
            name = token.split("=", 1)[0]
            if name in ("--help", "-h"):
                raise ValueError(f"option {name} is not allowed in a configuration step")
            if name not in options:
                close = difflib.get_close_matches(name, list(options), n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise ValueError(f"unknown option '{name}' for 'jraise {' '.join(words)}'{hint}")
            if options[name] and "=" not in token:
                i += 1
        i += 1
    try:
        ctx = command.make_context("jraise " + " ".join(words), list(args))
    except Exception as err:  # the CLI's own usage errors (bad value, missing option)
        raise ValueError(f"'jraise {' '.join(words)}': {_error_text(err)}") from err
    return words, dict(ctx.params)


def _is_number(token: str) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False


def _step_tokens(step) -> list:
    return step.get("run") if isinstance(step, dict) else None


def _placeholders(text: str) -> list[str]:
    return PLACEHOLDER.findall(text)


def _check_placeholders(text: str, data_keys, allow_model: bool) -> list[str]:
    bad = []
    for name in _placeholders(text):
        if name in ROOTS or (allow_model and name == "MODEL"):
            continue
        if allow_model and name.startswith("data.") and name[5:] in data_keys:
            continue
        bad.append("${" + name + "}")
    return bad


def budget_steps(config: dict) -> int | None:
    """Optimizer steps of the configuration's ``budget`` (ceil(round(f x N) / B) x epochs)."""
    budget = config.get("budget")
    if not budget:
        return None
    n = config["data"][budget["data"]]["records"]
    k = max(1, round(budget["fraction"] * n))
    return math.ceil(k / budget["batch_size"]) * budget["epochs"]


def validate(config: dict, path="<config>") -> list[dict]:
    """Checks a configuration; raises ConfigError listing every problem, each naming ``path``
    (and the step and option). Returns the parsed steps: {index, name, words, params}."""
    problems: list[str] = []
    where = str(path)

    def problem(msg):
        problems.append(f"{where}: {msg}")

    for key in TOP_KEYS:
        if key not in config:
            problem(f"missing required key {key!r}")
    if problems:
        raise ConfigError("\n".join(problems))
    if not isinstance(config["name"], str) or not config["name"]:
        problem("'name' must be a non-empty string")
    paper = config["paper"]
    if not isinstance(paper, dict) or not isinstance(paper.get("title"), str):
        problem("'paper' must be an object with a 'title'")
    if config["method"] not in METHODS:
        problem(f"unknown method {config['method']!r}; known: {', '.join(METHODS)}")
    model = config["model"]
    if not isinstance(model, dict) or not isinstance(model.get("path"), str):
        problem("'model' must be an object with a 'path'")
    elif not isinstance(model.get("hf_config"), dict):
        problem("'model.hf_config' must be an object with the architecture numbers")
    else:
        hf = model["hf_config"]
        for key in HF_KEYS:
            if key not in hf:
                problem(f"'model.hf_config' lacks {key!r}")
            elif key == "tie_word_embeddings":
                if not isinstance(hf[key], bool):
                    problem(f"'model.hf_config.{key}' must be true or false")
            elif isinstance(hf[key], bool) or not isinstance(hf[key], int) or hf[key] < 1:
                problem(f"'model.hf_config.{key}' must be a positive integer, got {hf[key]!r}")
        if not problems and hf["num_attention_heads"] % hf["num_key_value_heads"]:
            problem("'model.hf_config': num_attention_heads must be a multiple of num_key_value_heads")
        for bad in _check_placeholders(model["path"], (), allow_model=False):
            problem(f"'model.path': unknown placeholder {bad} (known: ${{MODELS}}, ${{DATA}}, ${{WORK}})")
    data = config["data"]
    if not isinstance(data, dict) or not data:
        problem("'data' must be a non-empty object of {key: {path, records}}")
        data = {}
    for key, entry in data.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            problem(f"'data.{key}' must be an object with a 'path'")
            continue
        records = entry.get("records")
        if isinstance(records, bool) or not isinstance(records, int) or records < 1:
            problem(f"'data.{key}.records' must be a positive integer (the expected record count), got {records!r}")
        for bad in _check_placeholders(entry["path"], (), allow_model=False):
            problem(f"'data.{key}.path': unknown placeholder {bad} (known: ${{MODELS}}, ${{DATA}}, ${{WORK}})")
    budget = config.get("budget")
    if budget is not None:
        ok = isinstance(budget, dict) and budget.get("data") in data and all(
            isinstance(budget.get(k), (int, float)) and budget.get(k) > 0 for k in ("fraction", "epochs", "batch_size"))
        if not ok:
            problem("'budget' must be {data: a data key, fraction, epochs, batch_size} with positive numbers")
            budget = None
    steps = config["steps"]
    if not isinstance(steps, list) or not steps:
        problem("'steps' must be a non-empty list")
        steps = []
    parsed = []
    for i, step in enumerate(steps):
        tokens = _step_tokens(step)
        label = f"step {i}" + (f" ({step.get('name')!r})" if isinstance(step, dict) and step.get("name") else "")
        if not isinstance(tokens, list) or not tokens:
            problem(f"{label}: needs 'run', a non-empty list of jraise arguments")
            continue
        if any(isinstance(t, bool) or not isinstance(t, (str, int, float)) for t in tokens):
            problem(f"{label}: 'run' entries must be strings or numbers")
            continue
        tokens = [str(t) for t in tokens]
        bad_ph = [b for t in tokens for b in _check_placeholders(t, data, allow_model=True)]
        if bad_ph:
            problem(f"{label}: unknown placeholder {bad_ph[0]} (known: ${{MODELS}}, ${{DATA}}, ${{WORK}}, "
                    f"${{MODEL}}, ${{data.<key>}} for {', '.join(data)})")
            continue
        try:
            words, params = parse_step(tokens)
        except (LookupError, ValueError) as err:
            problem(f"{label}: {err.args[0] if err.args else err}")
            continue
        parsed.append({"index": i, "name": step.get("name") or " ".join(words), "words": words, "params": params,
                       "baseline": bool(step.get("baseline", False)), "note": step.get("note")})
    if not problems and config["method"] in METHOD_COMMANDS:
        wanted = METHOD_COMMANDS[config["method"]]
        if not any(" ".join(s["words"]) in wanted for s in parsed):
            problem(f"method {config['method']!r} but no step runs {' or '.join('jraise ' + w for w in wanted)}")
    if not problems and budget is not None:
        expected = budget_steps(config)
        for s in parsed:
            command = " ".join(s["words"])
            if command == "select raise" and s["params"]["steps"] != expected:
                problem(f"step {s['index']}: --steps {s['params']['steps']} differs from the budget's {expected} "
                        f"optimizer steps")
            if command == "train" and s["params"].get("selector") and s["params"]["max_steps"] != expected:
                problem(f"step {s['index']}: --max-steps {s['params']['max_steps']} differs from the budget's "
                        f"{expected} optimizer steps")
    if problems:
        raise ConfigError("\n".join(problems))
    return parsed


# ---------------------------------------------------------------------------------------------
# Placeholders and paths
# ---------------------------------------------------------------------------------------------

def default_roots(config: dict, models=None, data=None, work=None) -> dict:
    """Root directories: the arguments, else JRAISE_MODELS/JRAISE_DATA/JRAISE_WORK, else defaults."""
    return {"MODELS": str(models or os.environ.get("JRAISE_MODELS") or "models"),
            "DATA": str(data or os.environ.get("JRAISE_DATA") or "data"),
            "WORK": str(work or os.environ.get("JRAISE_WORK") or Path("paper_runs") / config["name"])}


def _substitute(text: str, values: dict) -> str:
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


def expand(config: dict, roots: dict) -> dict:
    """{'model': path, 'data': {key: path}, 'steps': [[args...], ...]} with placeholders replaced."""
    model = _substitute(config["model"]["path"], roots)
    data = {k: _substitute(v["path"], roots) for k, v in config["data"].items()}
    values = {**roots, "MODEL": model, **{f"data.{k}": p for k, p in data.items()}}
    steps = [[_substitute(str(t), values) for t in s["run"]] for s in config["steps"]]
    return {"model": model, "data": data, "steps": steps}


def _norm(path) -> str:
    return os.path.normpath(str(path))


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _step_paths(params: dict, words: list[str]) -> tuple[list[str], list[str]]:
    """(inputs, outputs) of a parsed step: Path-valued options, outputs by name."""
    inputs, outputs = [], []
    for name, value in params.items():
        if not isinstance(value, Path):
            continue
        (outputs if name in OUTPUT_PARAMS else inputs).append(_norm(value))
    if words[:1] == ["select"] and words[1:] in (["less"], ["rose"]) and params.get("work_dir") is None:
        outputs.append(_norm(str(params["out"]) + ".work"))  # the default work directory beside OUT
    return inputs, outputs


def path_report(config: dict, steps: list[dict], expanded: dict, skip_baselines: bool = False) -> dict:
    """Which referenced paths exist: external inputs (model, data, step inputs that no earlier
    step writes), with the key or step that refers to them, and the inputs of steps that a
    skipped (baseline) step would have written."""
    refs: dict[str, list[str]] = {}

    def ref(path, who):
        refs.setdefault(_norm(path), []).append(who)

    ref(expanded["model"], "model.path")
    for key, path in expanded["data"].items():
        ref(path, f"data.{key}")
    written: list[str] = []
    skipped_outputs: list[str] = []
    unsatisfied = []
    for s in steps:
        words, params = parse_step(expanded["steps"][s["index"]])
        inputs, outputs = _step_paths(params, words)
        skip = skip_baselines and s["baseline"]
        for p in inputs:
            if any(_under(p, w) for w in written):
                continue
            if any(_under(p, w) for w in skipped_outputs):
                if not skip:
                    unsatisfied.append((s["index"], p))
                continue
            ref(p, f"step {s['index']}")
        (skipped_outputs if skip else written).extend(outputs)
    present = {p: who for p, who in refs.items() if os.path.exists(p)}
    missing = {p: who for p, who in refs.items() if not os.path.exists(p)}
    return {"present": present, "missing": missing, "unsatisfied": unsatisfied}


def count_records(path: str) -> int | None:
    """Non-blank lines of a .jsonl file (None for other formats or unreadable files)."""
    if not path.endswith(".jsonl") or not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def model_mismatches(config: dict, model_dir: str) -> list[str]:
    """Architecture numbers of the config that differ from the model directory's config.json."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return []
    try:
        found = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return [f"{path}: unreadable"]
    want = config["model"]["hf_config"]
    out = []
    for key in HF_KEYS:
        have = found.get(key)
        if key == "num_key_value_heads" and have is None:
            have = found.get("num_attention_heads")
        if key == "tie_word_embeddings" and have is None:
            have = False
        if have != want[key]:
            out.append(f"{path}: {key} is {have!r}, the configuration says {want[key]!r}")
    return out


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------

def _dtype_bytes(dtype: str) -> int:
    return 2 if dtype == "bfloat16" else 4


def _memory(hf: dict, total: int, dtype: str, trainable: int, copies: int = 1) -> dict:
    """Weights in ``dtype`` plus ``copies`` trainable states (16 bytes per trainable parameter)."""
    weights = total * _dtype_bytes(dtype)
    master, grad, adam = 4 * trainable * copies, 4 * trainable * copies, 8 * trainable * copies
    return {"weights_dtype": dtype, "weights_bytes": weights, "weights_bytes_bf16": 2 * total,
            "trainable_params": trainable, "master_bytes": master, "grad_bytes": grad, "adam_bytes": adam,
            "state_bytes": master + grad + adam}


def plan(config: dict, models=None, data=None, work=None, steps: list[dict] | None = None,
         path=None) -> list[dict]:
    """One dict per step: the expanded command, records read, optimizer steps, parameter and
    memory estimates (bytes), the feature-store size, a one-line explanation and its outputs."""
    parsed_raw = steps if steps is not None else validate(config, path or config.get("name", "<config>"))
    roots = default_roots(config, models, data, work)
    expanded = expand(config, roots)
    hf = config["model"]["hf_config"]
    total = parameter_count(hf)
    counts = {_norm(p): config["data"][k]["records"] for k, p in expanded["data"].items()}
    categories = {_norm(p): config["data"][k].get("categories") for k, p in expanded["data"].items()}
    runs: dict[str, dict] = {}  # run directory -> {dtype, epochs, lora_rank}
    policies: dict[str, dict] = {}  # RAISE policy directory -> {batch_size, lora_rank}
    rows = []
    for s, argv in zip(parsed_raw, [expanded["steps"][p["index"]] for p in parsed_raw]):
        words, params = parse_step(argv)
        command = " ".join(words)
        row = {"index": s["index"], "name": s["name"], "baseline": s["baseline"], "command": "jraise " + command,
               "argv": argv, "records": None, "optimizer_steps": 0, "examples_per_step": None, "params": None,
               "trainable_params": 0, "weights_dtype": None, "weights_bytes": 0, "weights_bytes_bf16": 0,
               "master_bytes": 0, "grad_bytes": 0, "adam_bytes": 0, "state_bytes": 0, "store_bytes": 0,
               "activation_bytes": 0, "detail": "", "outputs": {}}

        def n_of(key, params=params):
            return counts.get(_norm(params[key])) if params.get(key) is not None else None

        def lora(rank):
            return lora_parameter_count(hf, rank) if rank else total

        seq = params.get("max_len") or DEFAULT_SEQ
        if command in ("select less", "select rose"):
            n, m = n_of("pool"), n_of("val")
            row["records"] = n
            trainable = lora(params["lora_rank"])
            warm = params.get("warmup_run")
            if warm is not None:
                run = runs.get(_norm(warm), {})
                checkpoints = run.get("epochs", params["warmup_epochs"])
                dtype = run.get("dtype", "float32")
                trainable = lora(run["lora_rank"]) if run.get("lora_rank") else trainable
                warm_text = f"warmup: the {checkpoints} epoch checkpoints of {warm}"
                warm_seqs = 0
            else:
                checkpoints, dtype = params["warmup_epochs"], "float32"
                if n:
                    n_w = max(1, round(params["warmup_fraction"] * n))
                    bs = min(params["warmup_batch_size"], n_w)
                    row["optimizer_steps"] = math.ceil(n_w / bs) * checkpoints
                    row["examples_per_step"] = bs
                    warm_text = (f"warmup: {n_w:,} records x {checkpoints} epochs / batch {bs} = "
                                 f"{row['optimizer_steps']:,} steps (no accumulation)")
                    warm_seqs = bs
                else:
                    warm_text, warm_seqs = "warmup: pool size unknown", params["warmup_batch_size"]
            row.update(_memory(hf, total, dtype, trainable))
            # the feature pass materialises FEATURE_CHUNK per-example gradients at a time (float32)
            row["grad_bytes"] = max(row["grad_bytes"], FEATURE_CHUNK * 4 * trainable)
            row["state_bytes"] = row["master_bytes"] + row["grad_bytes"] + row["adam_bytes"]
            d = params["proj_dim"]
            if n:
                row["store_bytes"] = n * d * 2 * checkpoints + (m or 0) * d * 2 * checkpoints
                k = max(1, round(params["fraction"] * n))
                row["outputs"][_norm(params["out"])] = k
                counts[_norm(params["out"])] = k
                row["detail"] = (f"{warm_text}; per-example gradients: {n:,} train x {checkpoints} checkpoints"
                                 f" + {m or 0:,} validation x {checkpoints}, projected to d={d:,}; selects "
                                 f"{params['fraction']:g} = {k:,} records")
            sequences = max(warm_seqs, FEATURE_CHUNK)
            row["activation_bytes"] = activation_bytes(hf, sequences, seq, _dtype_bytes(dtype))
        elif command == "select raise":
            n, m = n_of("pool"), n_of("val")
            row["records"] = n
            episodes, t, b = params["episodes"], params["steps"], params["batch_size"]
            row["optimizer_steps"] = episodes * t
            row["examples_per_step"] = b
            row.update(_memory(hf, total, "float32", lora(params["lora_rank"])))
            row["activation_bytes"] = (activation_bytes(hf, b, seq, 4)
                                       + activation_bytes(hf, m or 0, seq, 4, backward=False))
            policies[_norm(params["out"])] = {"batch_size": b, "lora_rank": params["lora_rank"]}
            row["detail"] = (f"{params['clusters']} cluster(s), {episodes} episodes x {t} steps x {b} examples = "
                             f"{episodes * t:,} LLM updates (full pool and the {m or '?'} validation records "
                             f"on the device); static features: 2 x {n or '?':,} forward passes"
                             if n else f"{episodes} episodes x {t} steps x {b} examples")
        elif command == "train":
            dtype = params["dtype"]
            if params.get("selector"):
                policy = policies.get(_norm(params["policy"]), {})
                b = policy.get("batch_size")
                m = n_of("eval_data")
                row["records"] = n_of("data")
                row["optimizer_steps"] = params["max_steps"]
                row["examples_per_step"] = b
                row.update(_memory(hf, total, "float32", lora(policy.get("lora_rank", 0))))
                row["activation_bytes"] = (activation_bytes(hf, b or 0, seq, 4)
                                           + activation_bytes(hf, m or 0, seq, 4, backward=False))
                row["detail"] = (f"the RAISE policy's deterministic picks: {params['max_steps']} steps x "
                                 f"{b or '?'} examples, constant lr {params['lr']:g}")
                runs[_norm(params["out"])] = {"dtype": "float32", "epochs": 1, "lora_rank": policy.get("lora_rank", 0)}
            else:
                n = n_of("data")
                row["records"] = n
                order_len = n_of("order") if params.get("order") is not None else None
                per_epoch_records = order_len if order_len is not None else n
                b, accum, epochs = params["batch_size"], params["accum"], params["epochs"]
                if per_epoch_records:
                    steps_total = math.ceil(per_epoch_records / b) * epochs
                    if params.get("max_steps"):
                        steps_total = min(steps_total, params["max_steps"])
                    row["optimizer_steps"] = steps_total
                    what = (f"the --order sequence ({order_len:,} entries)" if order_len is not None
                            else f"{n:,} records")
                    row["detail"] = (f"{what} x {epochs} epoch(s) / batch {b} = {steps_total:,} steps"
                                     + (f" ({accum} micro-batches of {b // accum})" if accum > 1 else "")
                                     + (f", LoRA r={params['lora_rank']}" if params["lora_rank"] else
                                        ", full fine-tuning") + f", {dtype}, lr {params['lr']:g} {params['schedule']}")
                row["examples_per_step"] = b
                row.update(_memory(hf, total, dtype, lora(params["lora_rank"])))
                row["activation_bytes"] = activation_bytes(hf, max(1, b // accum), seq, _dtype_bytes(dtype))
                runs[_norm(params["out"])] = {"dtype": dtype, "epochs": epochs, "lora_rank": params["lora_rank"]}
        elif command == "interactions":
            n = n_of("pool")
            row["records"] = n
            k = categories.get(_norm(params["pool"]))
            r = k + 1 if k else None
            vmap = params["mode"] == "vmap"
            row["optimizer_steps"] = (r or 1) * params["steps"]
            row["examples_per_step"] = params["batch_size"]
            row.update(_memory(hf, total, "float32", lora(params["lora_rank"]), copies=(r or 1) if vmap else 1))
            row["activation_bytes"] = activation_bytes(hf, params["batch_size"] * ((r or 1) if vmap else 1), seq, 4)
            row["detail"] = (f"{r or 'K+1'} runs ({k or '?'} categories + baseline) x {params['steps']} steps x "
                             f"{params['batch_size']} examples ({params['mode']}"
                             + (", one trainable state per run" if vmap else ", one run at a time") + ")"
                             + (f", LoRA r={params['lora_rank']}" if params["lora_rank"] else ", full fine-tuning"))
        elif command == "select mixture":
            n = n_of("pool")
            row["records"] = n
            out_n = params.get("budget") or n
            if out_n:
                row["outputs"][_norm(params["out"])] = out_n
                counts[_norm(params["out"])] = out_n
            row["detail"] = (f"EE-CPO LP over Gamma: {_fmt_int(out_n)} records, edit budget {params['edit']:g}; "
                             "no model")
        elif command == "curriculum":
            n = n_of("pool")
            row["records"] = n
            if n:
                row["outputs"][_norm(params["out"])] = 3 * n
                counts[_norm(params["out"])] = 3 * n
            row["detail"] = f"DT-CSFT order: 3 x {_fmt_int(n)} entries (every record 3 times); no model"
        elif command == "eval":
            n = n_of("data")
            row["records"] = n
            row.update(_memory(hf, total, "float32", 0))
            row["activation_bytes"] = activation_bytes(hf, params["batch_size"], seq, 4, backward=False)
            row["detail"] = (f"{params['kinds']} on {_fmt_int(n)} records (forward passes"
                             f"{', greedy generation' if 'exact' in params['kinds'] else ''})")
        elif command in ("select random", "select full", "select longest", "select perplexity", "select ifd",
                         "select rds"):
            n = n_of("pool")
            row["records"] = n
            k = n if command == "select full" else (max(1, round(params["fraction"] * n)) if n else None)
            if k:
                row["outputs"][_norm(params["out"])] = k
                counts[_norm(params["out"])] = k
            if command in ("select perplexity", "select ifd", "select rds"):
                row.update(_memory(hf, total, "float32", 0))
                row["activation_bytes"] = activation_bytes(hf, params["batch_size"], seq, 4, backward=False)
            row["detail"] = f"{words[1]}: {_fmt_int(k)} of {_fmt_int(n)} records" + (
                "" if command in ("select random", "select full", "select longest") else " (forward passes)")
        elif command == "select sspl":
            row["records"] = n_of("pool")
            row["optimizer_steps"] = params["steps"]
            row["examples_per_step"] = params["batch_size"]
            row.update(_memory(hf, total, "float32", total))
            row["activation_bytes"] = activation_bytes(hf, params["batch_size"], seq, 4)
        elif command == "categories":
            row["records"] = n_of("pool")
            row.update(_memory(hf, total, "float32", 0))
        row["params"] = total if row["weights_bytes"] else None
        row["memory_bytes"] = row["weights_bytes"] + row["state_bytes"]
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Printing
# ---------------------------------------------------------------------------------------------

def fmt_bytes(n: int | None) -> str:
    """``n`` bytes in the largest binary unit it reaches, one decimal ("-" for 0 or None)."""
    if not n:
        return "-"
    for unit, size in (("TiB", 1024 ** 4), ("GiB", GIB), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _fmt_int(n) -> str:
    return f"{n:,}" if n else "-"


def _fmt_params(n) -> str:
    if not n:
        return "-"
    if n >= 1e9:
        return f"{n / 1e9:.2f} B"
    if n >= 1e6:
        return f"{n / 1e6:.1f} M"
    return f"{n:,}"


def format_plan(config: dict, rows: list[dict], paths: dict, config_path=None, device_gib: float = 80.0,
                mismatches=(), record_checks=(), model_path=None) -> str:
    """The printed plan of one configuration: a header (paper, model size, budget), the table of
    `plan`'s ``rows``, every step's command and detail, warnings for steps whose weights and
    trainable state exceed ``device_gib``, the local paths of `path_report` (``paths``) with the
    architecture ``mismatches`` and ``record_checks``, the notes and how memory was estimated."""
    hf = config["model"]["hf_config"]
    total = parameter_count(hf)
    paper = config["paper"]
    arxiv = f" (arXiv {paper['arxiv']})" if paper.get("arxiv") else ""
    venue = f", {paper['venue']}" if paper.get("venue") else ""
    tied = "tied" if hf["tie_word_embeddings"] else "untied"
    lines = [f"== {config['name']} ({config_path or 'config'}): method {config['method']}",
             f"paper: {paper.get('title')}{arxiv}{venue}",
             (f"model: {model_path or config['model']['path']}: {total:,} parameters ({fmt_bytes(2 * total)} in "
              f"bf16, {fmt_bytes(4 * total)} in float32; {tied} embeddings)")]
    expected = budget_steps(config)
    if expected is not None:
        b = config["budget"]
        n = config["data"][b["data"]]["records"]
        k = max(1, round(b["fraction"] * n))
        lines.append(f"budget: {b['fraction']:g} of {n:,} = {k:,} records x {b['epochs']} epochs / batch "
                     f"{b['batch_size']} = {expected:,} optimizer steps for every method")
    header = (f"{'#':>2}  {'step':<32} {'command':<16} {'records':>9} {'opt.steps':>9} {'trainable':>9} "
              f"{'weights':>16} {'train state':>11} {'total':>9} {'store':>9} {'activ.<=':>9}")
    lines += ["", header, "-" * len(header)]
    for r in rows:
        name = ("* " if r["baseline"] else "") + r["name"]
        weights = f"{fmt_bytes(r['weights_bytes'])} {'bf16' if r['weights_dtype'] == 'bfloat16' else 'fp32'}" \
            if r["weights_bytes"] else "-"
        lines.append(f"{r['index']:>2}  {name[:32]:<32} {r['command'][7:][:16]:<16} {_fmt_int(r['records']):>9} "
                     f"{_fmt_int(r['optimizer_steps']):>9} {_fmt_params(r['trainable_params']):>9} {weights:>16} "
                     f"{fmt_bytes(r['state_bytes']):>11} {fmt_bytes(r['memory_bytes']):>9} "
                     f"{fmt_bytes(r['store_bytes']):>9} {fmt_bytes(r['activation_bytes']):>9}")
    if any(r["baseline"] for r in rows):
        lines.append("* baseline step (skipped with --no-baselines)")
    lines.append("")
    lines.append("steps:")
    for r in rows:
        lines.append(f"{r['index']:>3}. jraise {' '.join(_quote(a) for a in r['argv'])}")
        if r["detail"]:
            lines.append(f"     {r['detail']}")
    over = [r for r in rows if r["memory_bytes"] > device_gib * GIB]
    if over:
        lines.append("")
        for r in over:
            lines.append(f"warning: step {r['index']} needs {fmt_bytes(r['memory_bytes'])} for weights and "
                         f"trainable state alone, more than a {device_gib:g} GiB device (jraise trains on one device)")
    lines.append("")
    total_refs = len(paths["present"]) + len(paths["missing"])
    lines.append(f"local paths: {len(paths['present'])} of {total_refs} external inputs present"
                 + (f", {len(paths['missing'])} missing:" if paths["missing"] else ""))
    for p, who in sorted(paths["present"].items()):
        lines.append(f"  present  {p}  ({', '.join(who)})")
    for p, who in sorted(paths["missing"].items()):
        unread = "" if any(w.startswith("step") for w in who) else "; read by no step"
        lines.append(f"  missing  {p}  ({', '.join(who)}{unread})")
    for index, p in paths["unsatisfied"]:
        lines.append(f"  needs a skipped baseline step: step {index} reads {p}")
    for line in list(mismatches) + list(record_checks):
        lines.append(f"  check    {line}")
    if config.get("notes"):
        lines.append("")
        lines.append("notes:")
        for note in config["notes"]:
            lines.append(f"  - {note}")
    lines.append("")
    lines.append("memory: estimates from the architecture numbers (weights in the dtype jraise loads; trainable "
                 "state = fp32 master + gradient + Adam m, v); activ.<= is a rough upper bound at --max-len "
                 "without remat; store = fp16 gradient features on disk.")
    return "\n".join(lines)


def _quote(arg: str) -> str:
    return arg if re.fullmatch(r"[\w@%+=:,./${}-]+", arg) else json.dumps(arg)


def record_checks(config: dict, expanded: dict) -> list[str]:
    """Data files (JSONL) present whose record count differs from the configuration's."""
    out = []
    for key, path in expanded["data"].items():
        found = count_records(path)
        want = config["data"][key]["records"]
        if found is not None and found != want:
            out.append(f"{path}: {found:,} records, the configuration expects {want:,} (data.{key})")
    return out


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------

def run_steps(config: dict, steps: list[dict], expanded: dict, skip_baselines: bool = False,
              runner=None, echo=print) -> int:
    """Runs the steps in order with ``runner(argv) -> returncode`` (default: a subprocess of
    ``python -m jraise.cli``); stops at the first failure and returns its code (0: all done)."""
    if runner is None:
        def runner(argv):
            return subprocess.run([sys.executable, "-m", "jraise.cli", *argv], check=False).returncode
    chosen = [s for s in steps if not (skip_baselines and s["baseline"])]
    for k, s in enumerate(chosen, 1):
        argv = expanded["steps"][s["index"]]
        _, params = parse_step(argv)
        for name in OUTPUT_PARAMS:
            if isinstance(params.get(name), Path):
                params[name].parent.mkdir(parents=True, exist_ok=True)
        echo(f"[{k}/{len(chosen)}] step {s['index']} ({s['name']}): jraise {' '.join(_quote(a) for a in argv)}")
        code = runner(argv)
        if code != 0:
            echo(f"step {s['index']} ({s['name']}) failed with exit code {code}; stopping "
                 f"(the jraise commands resume: fix the cause and run again)")
            return code
    echo(f"all {len(chosen)} steps done")
    return 0


def _print_error(text: str) -> None:
    print(text, file=sys.stderr)


def run_configs(config_paths, dry_run: bool = False, models=None, data=None, work=None,
                skip_baselines: bool = False, device_gib: float = 80.0, echo: Callable[[str], None] = print,
                error: Callable[[str], None] = _print_error) -> int:
    """Validates each configuration file and either prints its plan (``dry_run``: runs nothing,
    writes nothing; several files are fine) or runs its steps (one file only). ``models``,
    ``data`` and ``work``: the placeholder roots (`default_roots`); ``skip_baselines``: leave out
    the steps marked ``baseline``; ``device_gib``: device memory for the plan's warnings.

    Returns the exit code: 0 when every plan printed or every step ran, 2 for an invalid
    configuration (reported through ``error``, the others still planned) or a run whose inputs
    are missing (nothing run), else the code of the first failing step."""
    config_paths = list(config_paths)
    if not dry_run and len(config_paths) > 1:
        raise ValueError("run one configuration at a time (several are fine with a dry run)")
    status = 0
    for config_path in config_paths:
        try:
            config = load_config(config_path)
            steps = validate(config, config_path)
        except ConfigError as err:
            error(f"invalid configuration:\n{err}")
            status = 2
            continue
        roots = default_roots(config, models, data, work)
        expanded = expand(config, roots)
        paths = path_report(config, steps, expanded, skip_baselines=skip_baselines)
        mismatches = model_mismatches(config, expanded["model"])
        checks = record_checks(config, expanded)
        if dry_run:
            rows = plan(config, models, data, work, steps=steps)
            echo(format_plan(config, rows, paths, config_path, device_gib, mismatches, checks,
                             model_path=expanded["model"]))
            echo("")
            continue
        problems = [f"missing: {p} ({', '.join(who)})" for p, who in sorted(paths["missing"].items())
                    if any(w.startswith("step") for w in who)]
        problems += [f"step {i} reads {p}, which only a skipped baseline step writes" for i, p in paths["unsatisfied"]]
        problems += mismatches
        if problems:
            error(f"{config_path}: cannot run:\n  " + "\n  ".join(problems))
            return 2
        return run_steps(config, steps, expanded, skip_baselines=skip_baselines, echo=echo)
    return status
