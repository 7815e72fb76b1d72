"""Derived categories on files: the job behind ``jraise categories``.

`derive_categories` labels each pool example ``derived-<j>`` by K-means over its pooled
embeddings (`jraise.select.embeddings`) and can write the labels as the categories file that
``--categories`` options read (`jraise.jobs.beyond_iid.read_categorised`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from jraise.atomic import atomic_write_text
from jraise.data.pool import InstructionPool, with_skipped
from jraise.select.embeddings import cluster_embeddings, pooled_embeddings

DERIVED_PREFIX = "derived-"


def derive_categories(model, pool: InstructionPool, k: int, dims: int = 32, seed: int = 0,
                      out: str | os.PathLike | None = None) -> list[str]:
    """``derived-<j>`` per example; with ``out``, writes JSON {"derived": true, "k", "seed",
    "pool_fingerprint", "categories": {id: category}} (what ``--categories`` options read), plus
    ``"skipped"`` when the pool was loaded with bad records skipped (`skipped_summary`)."""
    labels = cluster_embeddings(pooled_embeddings(model, pool), k, dims, seed)
    cats = [f"{DERIVED_PREFIX}{int(j)}" for j in labels]
    if out is not None:
        document = {"derived": True, "method": "kmeans(pooled hidden state)", "k": k, "dims": dims, "seed": seed,
                    "pool_fingerprint": pool.fingerprint, "categories": dict(zip(pool.ids, cats))}
        atomic_write_text(Path(out), json.dumps(with_skipped(document, pool), indent=1) + "\n")
    return cats
