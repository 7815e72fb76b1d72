"""Few-shot exemplars from lm-evaluation-harness task files as SFT records.

lm-eval keeps the exemplars of some tasks inline in the task's YAML (``fewshot_config.samples``):
BBH's 3-shot chain-of-thought prompts (27 tasks), the Flan chain-of-thought prompts of MMLU (5
per subject) and GSM8K's 8 chain-of-thought exemplars. Each sample becomes an Alpaca-shaped
record: ``instruction`` = the task's question text, ``output`` = the worked answer that ends in
"So the answer is ..." / "The answer is ...", ``category`` = the task. These are the few-shot
validation sets of the kind LESS uses (its BBH/MMLU targets), so `jraise select less|rose` can
take them as ``--val``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FewShotSet:
    """A family of lm-eval task files: a glob inside the wheel and the sample fields to read."""

    name: str
    glob: str  # fnmatch pattern over paths inside the lm-eval wheel
    question_field: str
    task_prefix: str  # stripped from the YAML's `task` to name the category


FEWSHOT_SETS: tuple[FewShotSet, ...] = (
    FewShotSet("bbh_cot_fewshot", "lm_eval/tasks/bbh/cot_fewshot/[!_]*.yaml", "input", "bbh_cot_fewshot_"),
    FewShotSet("mmlu_cot_fewshot", "lm_eval/tasks/mmlu/flan_cot_fewshot/mmlu_*.yaml", "question",
               "mmlu_flan_cot_fewshot_"),
    FewShotSet("gsm8k_cot_fewshot", "lm_eval/tasks/gsm8k/gsm8k-cot.yaml", "question", ""),
)


def fewshot_records(spec: FewShotSet, task: dict, where: str) -> list[dict]:
    """The SFT records of one parsed task YAML; `where` (the file) names it in errors."""
    samples = (task.get("fewshot_config") or {}).get("samples")
    if not isinstance(samples, list) or not samples:
        raise ValueError(f"{where}: no fewshot_config.samples list")
    name = str(task.get("task") or task.get("dataset_name") or spec.name)
    category = name.removeprefix(spec.task_prefix) if spec.task_prefix else name
    records = []
    for i, sample in enumerate(samples):
        question, target = sample.get(spec.question_field), sample.get("target")
        if not isinstance(question, str) or not question.strip() or not isinstance(target, str) or not target.strip():
            raise ValueError(f"{where}: sample {i}: expected non-empty '{spec.question_field}' and 'target' strings")
        records.append({"id": f"{category}-{i}", "category": category,
                        "instruction": question.strip(), "output": target.strip()})
    return records
