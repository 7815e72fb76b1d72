"""Shared set-up of the whole suite: what many modules build, built once per test run (once per
xdist worker), and one XLA compilation cache for every process of the run.

* ``make_testbed(**write_testbed args)``: a testbed directory, written once per distinct arguments;
  ``tiny_config(tok, **overrides)``: the `tiny` preset for a tokenizer (its EOS and pad ids);
  ``make_model_dir(tokenizer_dir, seed=0, **overrides)``: a saved tiny model directory (HF format,
  with the tokenizer), once per distinct arguments;
* ``testbed`` / ``testbed_tok``: the standard tiny testbed of the suite (40 records of first,
  reverse and add; 1 validation and 1 test record a category) and its tokenizer;
* ``study_work(work, config)``: a selection-study work directory with its base model in place
  (trained once per distinct base settings).

Everything handed out is shared by every test of a worker: files and directories are read-only by
contract (a test that edits a file copies it to its own ``tmp_path`` first), dicts of paths are
fresh copies, and a model is never shared -- tests that need one call `init_model` on the shared
config (or `load_model` on the shared directory), which is cheap once its shapes are compiled.

The compilation cache (JAX's persistent cache, ``JAX_COMPILATION_CACHE_DIR``): set before JAX
starts and inherited by the xdist workers and by every subprocess a test starts, so a program
compiled once -- the same tiny model's train step in another module, a CLI subprocess, the other
worker -- is read back instead of compiled again. It lives in pytest's cache directory
(``.pytest_cache/d/jax-compilation-cache``) and so also serves later runs (a run on a cold cache
pays every compile once; ``pytest --cache-clear`` empties it). ``JRAISE_TEST_XLA_CACHE=run`` gives
a fresh directory for this run only (removed at its end), ``=off`` no cache; a
``JAX_COMPILATION_CACHE_DIR`` set by the caller is used as it is. An entry is keyed by the whole
program, the JAX/XLA versions and flags and the device, so a hit is the executable a compile would
give.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import pytest

_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
# Programs that compile in under 0.1 s are not worth a file (eager op-by-op dispatch compiles
# thousands of those); the size cap keeps the directory bounded (least recently used entries go)
# and turns on JAX's file lock, so concurrent processes never read a half-written entry.
_CACHE_SETTINGS = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.1",
                   "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
                   "JAX_COMPILATION_CACHE_MAX_SIZE": str(4 * 1024**3)}


def pytest_configure(config):
    mode = os.environ.get("JRAISE_TEST_XLA_CACHE", "keep")
    if os.environ.get(_CACHE_ENV) or mode == "off":  # the caller's own, or an xdist worker inheriting the run's
        return
    cache = getattr(config, "cache", None)  # None under -p no:cacheprovider
    if mode == "run" or cache is None:
        path = tempfile.mkdtemp(prefix="jraise-tests-xla-")
        config._jraise_xla_cache = path  # removed when the run ends
    else:
        path = str(cache.mkdir("jax-compilation-cache"))
    os.environ[_CACHE_ENV] = path
    for name, value in _CACHE_SETTINGS.items():
        os.environ.setdefault(name, value)
    import sys

    if "jax" in sys.modules:  # imported before this hook: JAX read its environment already
        import jax

        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs",
                          float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
        jax.config.update("jax_persistent_cache_min_entry_size_bytes",
                          int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]))
        jax.config.update("jax_compilation_cache_max_size", int(os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"]))


def pytest_unconfigure(config):
    path = getattr(config, "_jraise_xla_cache", None)
    if path:
        shutil.rmtree(path, ignore_errors=True)
        os.environ.pop(_CACHE_ENV, None)


# ----------------------------------------------------------------------------------------------
# Testbeds, tokenizers and tiny models


def _key(kwargs: dict) -> str:
    return json.dumps(kwargs, sort_keys=True, default=str)


def _listing(path) -> dict:
    """Every file under ``path``: (size, mtime) by relative name."""
    return {str(f.relative_to(path)): (f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(path.rglob("*"))
            if f.is_file()}


def _check_untouched(shared: dict) -> None:
    """At the end of the session: no test wrote into, or changed, a shared directory."""
    changed = {str(path): sorted(set(before.items()) ^ set(_listing(path).items())) for path, before in shared.items()
               if _listing(path) != before}
    assert not changed, f"a test changed a shared (read-only) directory: {changed}"


@pytest.fixture(scope="session")
def make_testbed(tmp_path_factory):
    """``make_testbed(**kwargs)``: the paths dict of ``write_testbed(dir, **kwargs)`` (a copy),
    written once per session for each distinct ``kwargs``. Read-only."""
    from jraise.testbed import write_testbed

    written: dict[str, dict] = {}
    shared: dict = {}

    def make(**kwargs) -> dict:
        key = _key(kwargs)
        if key not in written:
            root = tmp_path_factory.mktemp("testbed") / "tb"
            written[key] = write_testbed(root, **kwargs)
            shared[root] = _listing(root)
        return dict(written[key])

    yield make
    _check_untouched(shared)


@pytest.fixture(scope="session")
def tiny_config():
    """``tiny_config(tok, **overrides)``: the `tiny` preset for ``tok`` (its vocabulary, EOS and pad)."""
    from jraise.model import preset_config

    def config(tok, **overrides):
        return preset_config("tiny", **{"vocab_size": len(tok), "eos_token_id": tok.eos_token_id,
                                        "pad_token_id": tok.pad_token_id, **overrides})

    return config


@pytest.fixture(scope="session")
def make_model_dir(tmp_path_factory, tiny_config):
    """``make_model_dir(tokenizer_dir, seed=0, **overrides)``: a tiny model (`tiny_config` of the
    tokenizer, ``init_model(config, seed)``) saved with its tokenizer, once per distinct arguments.
    Read-only: a test that rewrites a model directory copies it first."""
    from jraise.model import init_model, load_tokenizer, save_model

    saved: dict[str, object] = {}
    shared: dict = {}

    def make(tokenizer_dir, seed: int = 0, **overrides):
        key = _key({"tokenizer": str(tokenizer_dir), "seed": seed, **overrides})
        if key not in saved:
            tok = load_tokenizer(tokenizer_dir)
            config = tiny_config(tok, **overrides)
            path = tmp_path_factory.mktemp("model")
            save_model(init_model(config, seed=seed), config, path)
            tok.save_pretrained(str(path))
            saved[key], shared[path] = path, _listing(path)
        return saved[key]

    yield make
    _check_untouched(shared)


STANDARD_TESTBED = dict(n_train=40, n_val_per_category=1, n_test_per_category=1,
                        categories=["first", "reverse", "add"])


@pytest.fixture(scope="session")
def testbed(make_testbed):
    """The standard tiny testbed (`STANDARD_TESTBED`): a paths dict. Read-only."""
    return make_testbed(**STANDARD_TESTBED)


@pytest.fixture(scope="session")
def testbed_tok(testbed):
    """The testbed's character-level tokenizer (do not change its settings)."""
    from jraise.model import load_tokenizer

    return load_tokenizer(testbed["tokenizer"])


# ----------------------------------------------------------------------------------------------
# The selection study's base model


@pytest.fixture(scope="session")
def study_work(tmp_path_factory):
    """``study_work(work, config) -> work``: ``work`` with the study's base model for ``config``
    already in place (``work/base``, as `jraise.study.build_base` leaves it, which `run_study` then
    reuses). The base is trained once per session for each distinct base setting and copied."""
    from dataclasses import asdict
    from pathlib import Path

    built: dict[str, Path] = {}

    def make(work, config):
        from jraise.study import build_base

        key = _key({k: v for k, v in asdict(config).items()
                    if k.startswith("base_") or k in ("batch_size", "max_len", "targets")})
        if key not in built:
            template = tmp_path_factory.mktemp("study_base")
            build_base(template, config, echo=lambda *_: None)
            built[key] = template / "base"
        shutil.copytree(built[key], Path(work) / "base")
        return Path(work)

    return make
