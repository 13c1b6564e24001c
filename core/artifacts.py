"""Content-addressed artifacts: adapters and checkpoints are named by the hash of their bytes.

An artifact is a directory of files (for a LoRA adapter: peft's ``adapter_config.json`` and
``adapter_model.safetensors``). Its hash is the SHA-256 over the sorted relative file names and
their contents, so the same weights always get the same name and a name is never reused for
different weights. Workers load by hash and can roll back by pointing at an earlier hash.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path


def hash_directory(path: Path) -> str:
    """SHA-256 hex digest of a directory's files (names and bytes), independent of mtime."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file())
    if not files:
        raise ValueError(f"artifact directory {path} is empty")
    for file in files:
        rel = file.relative_to(path).as_posix().encode()
        digest.update(len(rel).to_bytes(4, "big"))
        digest.update(rel)
        data = file.read_bytes()
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.hexdigest()


def store_directory(src: Path, store_root: Path) -> tuple[str, Path]:
    """Copy ``src`` into ``store_root/<hash>`` (idempotent) and return (hash, stored path).

    The copy is written to a temporary sibling and renamed, so a reader never sees a
    half-written artifact under its final name.
    """
    digest = hash_directory(src)
    final = store_root / digest
    if final.exists():
        return digest, final
    store_root.mkdir(parents=True, exist_ok=True)
    tmp = store_root / f".tmp-{digest}"
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(src, tmp)
    tmp.rename(final)
    return digest, final
