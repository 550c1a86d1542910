"""Saving detector artifacts and checkpoints without pickle.

A state is a tree of dicts whose leaves are numpy arrays or JSON values. It is
written as one ``.npz`` (arrays under slash-joined keys, the JSON skeleton under
``__json__``) and read back with ``allow_pickle=False``: a tampered file can
corrupt numbers, never run code. ``manifest.json`` records a sha256 per artifact
so that ``run`` refuses artifacts that are not the ones ``train`` wrote.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

_ARRAY = "__ndarray__"
MANIFEST = "manifest.json"


class ArtifactError(RuntimeError):
    """An artifact is missing, altered, or not what the manifest says."""


def _split(tree: Any, prefix: str, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(tree, np.ndarray):
        arrays[prefix] = tree
        return {_ARRAY: prefix}
    if isinstance(tree, dict):
        return {str(k): _split(v, f"{prefix}/{k}", arrays) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [_split(v, f"{prefix}/{i}", arrays) for i, v in enumerate(tree)]
    if isinstance(tree, np.generic):
        return tree.item()
    return tree


def _join(tree: Any, arrays: Any) -> Any:
    if isinstance(tree, dict):
        if set(tree) == {_ARRAY}:
            return arrays[tree[_ARRAY]]
        return {k: _join(v, arrays) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_join(v, arrays) for v in tree]
    return tree


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_tree(path: str | Path, tree: dict[str, Any]) -> None:
    """Write a state tree atomically (a crash leaves the old file, never half a new one)."""
    arrays: dict[str, np.ndarray] = {}
    skeleton = _split(tree, "", arrays)
    payload = {k.lstrip("/") or "_": v for k, v in arrays.items()}
    rename = {k: (k.lstrip("/") or "_") for k in arrays}
    skeleton_json = json.dumps(_rekey(skeleton, rename), allow_nan=True)
    payload["__json__"] = np.frombuffer(skeleton_json.encode(), dtype=np.uint8)
    _atomic_write(Path(path), lambda fh: np.savez(fh, **payload))


def _rekey(tree: Any, rename: dict[str, str]) -> Any:
    if isinstance(tree, dict):
        if set(tree) == {_ARRAY}:
            return {_ARRAY: rename[tree[_ARRAY]]}
        return {k: _rekey(v, rename) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_rekey(v, rename) for v in tree]
    return tree


def load_tree(path: str | Path) -> dict[str, Any]:
    """Read a state tree written by :func:`save_tree`; never unpickles."""
    with np.load(Path(path), allow_pickle=False) as data:
        skeleton = json.loads(bytes(data["__json__"]).decode())
        arrays = {k: data[k] for k in data.files if k != "__json__"}
    return _join(skeleton, arrays)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: str | Path, info: dict[str, Any]) -> Path:
    """Hash every artifact file in ``directory`` into ``manifest.json``."""
    directory = Path(directory)
    files = {
        p.name: sha256_file(p)
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
    }
    manifest = {**info, "files": files}
    _atomic_write(directory / MANIFEST, lambda fh: fh.write(json.dumps(manifest, indent=2).encode()))
    return directory / MANIFEST


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """Load the manifest and verify every listed file's sha256; raise on any mismatch."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{path}: no manifest; run `inferwatch train` to create the artifacts")
    manifest = json.loads(path.read_text())
    for name, digest in manifest.get("files", {}).items():
        f = directory / name
        if not f.is_file():
            raise ArtifactError(f"{f}: listed in {MANIFEST} but missing")
        actual = sha256_file(f)
        if actual != digest:
            raise ArtifactError(
                f"{f}: sha256 {actual} does not match {MANIFEST} ({digest}); "
                "the artifact was altered or replaced: retrain or restore it"
            )
    return manifest
