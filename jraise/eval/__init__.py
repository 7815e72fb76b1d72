"""jraise.eval: per-category response loss, multiple-choice log-likelihood accuracy, exact match.

`metrics` holds the pure (and jitted) scoring pieces, on the log-likelihoods of `jraise.loglik`;
`normalise` the answer normalisers of exact match;
`report` runs them over files, record lists and pools and writes JSON results. `evaluate` is the
one-call entry point.
"""

from jraise.eval.metrics import (
    NO_CATEGORY,
    accuracy_summary,
    choose_options,
    loss_summary,
    option_scores,
    response_token_nll,
    sequence_log_probs,
)
from jraise.eval.normalise import NORMALISERS, answers_match, gsm8k_answer, squad_answer
from jraise.eval.report import (
    KINDS,
    ExactMatchOptions,
    LossOptions,
    MultipleChoiceOptions,
    evaluate,
    evaluate_exact_match,
    evaluate_loss,
    evaluate_multiple_choice,
    greedy_completions,
    load_eval_records,
    option_log_probs,
    write_json_atomic,
)

__all__ = [
    "NO_CATEGORY", "NORMALISERS", "accuracy_summary", "answers_match", "choose_options", "gsm8k_answer", "squad_answer",
    "loss_summary", "option_scores", "response_token_nll", "sequence_log_probs",
    "KINDS", "ExactMatchOptions", "LossOptions", "MultipleChoiceOptions", "evaluate", "evaluate_exact_match",
    "evaluate_loss", "evaluate_multiple_choice", "greedy_completions", "load_eval_records", "option_log_probs",
    "write_json_atomic",
]
