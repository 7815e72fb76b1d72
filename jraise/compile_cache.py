"""A small bounded cache of compiled (jitted) programs, keyed by what they were built from.

Repeated calls on the same model structure and settings (training runs, feature shards, checkpoints,
tests) then compile once. Keys must be hashable: NNX GraphDefs hash by structure, frozen dataclasses
by value; `dtypes_key` turns a per-leaf dtype pytree into a hashable key. The oldest entry is
dropped when the cache is full.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import jax


def dtypes_key(dtypes) -> tuple | None:
    """A hashable key of a dtype pytree (None stays None): (path, dtype name) per leaf."""
    if dtypes is None:
        return None
    return tuple((jax.tree_util.keystr(p), str(d)) for p, d in jax.tree_util.tree_leaves_with_path(dtypes))


class CompiledCache:
    """``cache.get(key, build)``: ``build()``'s result for ``key``, built once (at most ``size``
    kept, the least recently used dropped first)."""

    def __init__(self, size: int = 8):
        self.size = size
        self._entries: dict[Hashable, Any] = {}

    def get(self, key: Hashable, build: Callable[[], Any]) -> Any:
        if key in self._entries:
            self._entries[key] = self._entries.pop(key)  # most recently used last
        else:
            if len(self._entries) >= self.size:
                self._entries.pop(next(iter(self._entries)))
            self._entries[key] = build()
        return self._entries[key]
