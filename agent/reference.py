"""Reference data: what "normal" looks like, for ``train`` and ``eval``.

Accepted inputs (CONTRACT.md, ``train --reference``): an ``.npz`` with ``X`` and
optional ``y`` (loaded without pickle), or a JSONL file of native inference or
feedback events (``input`` plus ``label`` or ``output``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class ReferenceError(ValueError):
    """The reference file cannot be used; the message says what to fix."""


@dataclass(frozen=True)
class ReferenceData:
    X: np.ndarray  # float32 [n, d], flattened
    y: np.ndarray | None  # int64 [n] class labels, when known
    input_shape: tuple[int, ...]  # the shape before flattening, e.g. (8, 8)

    @property
    def dim(self) -> int:
        return int(self.X.shape[1])

    @property
    def n_classes(self) -> int | None:
        return None if self.y is None else int(self.y.max()) + 1

    def take(self, rows: np.ndarray) -> ReferenceData:
        """The reference restricted to ``rows`` (indices), labels with them."""
        return ReferenceData(self.X[rows], None if self.y is None else self.y[rows], self.input_shape)

    @staticmethod
    def concat(parts: list[ReferenceData]) -> ReferenceData:
        """The rows of ``parts`` (of one input shape) in one reference; labels only when every part has them."""
        ys = [p.y for p in parts]
        return ReferenceData(np.concatenate([p.X for p in parts]),
                             None if any(y is None for y in ys) else np.concatenate(ys), parts[0].input_shape)

    def split(self, holdout: float, seed: int = 0) -> tuple[ReferenceData, ReferenceData]:
        """A (fit, calibration) split; detectors calibrate p-values on data they did not fit."""
        idx = np.random.default_rng(seed).permutation(len(self.X))
        cut = round(len(idx) * (1 - holdout))
        return self.take(idx[:cut]), self.take(idx[cut:])

    def folds(self, k: int, seed: int = 0) -> list[tuple[ReferenceData, ReferenceData]]:
        """``k`` (rest, held) pairs whose held parts cut the rows in ``k`` near-equal random folds: cross-fitting,
        where every row is held out once and so can be scored by a detector that was fitted without it."""
        if not 2 <= k <= len(self.X):
            raise ValueError(f"cannot cut {len(self.X)} reference rows in {k} folds: expected 2 to {len(self.X)}")
        held = np.array_split(np.random.default_rng(seed).permutation(len(self.X)), k)
        return [(self.take(np.sort(np.concatenate(held[:i] + held[i + 1:]))), self.take(np.sort(h)))
                for i, h in enumerate(held)]

def load_reference(path: str | Path) -> ReferenceData:
    path = Path(path)
    if not path.is_file():
        raise ReferenceError(f"{path}: no such file; expected an .npz with X (and y) or a JSONL of events")
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                if "X" not in data.files:
                    raise ReferenceError(f"{path}: X: missing; expected an array of inputs named X")
                X = np.asarray(data["X"])
                y = np.asarray(data["y"]).astype(np.int64) if "y" in data.files else None
        except ValueError as exc:  # object arrays need pickle: refuse them
            raise ReferenceError(f"{path}: cannot be read without unpickling ({exc})") from None
    else:
        X, y = _load_jsonl(path)
    if X.ndim < 2 or len(X) < 10:
        raise ReferenceError(f"{path}: X: expected at least 10 rows of inputs, got shape {X.shape}")
    shape = tuple(int(s) for s in X.shape[1:])
    X = X.reshape(len(X), -1).astype(np.float32)
    if not np.isfinite(X).all():
        raise ReferenceError(f"{path}: X: contains NaN or infinity; clean the reference data")
    if y is not None and (len(y) != len(X) or y.min() < 0):
        raise ReferenceError(f"{path}: y: expected {len(X)} non-negative class labels")
    return ReferenceData(X=X, y=y, input_shape=shape)


def _load_jsonl(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    rows, labels = [], []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                rows.append(np.asarray(obj["input"], dtype=np.float32))
            except (ValueError, KeyError, TypeError) as exc:
                raise ReferenceError(f"{path}:{n}: input: expected a JSON event with numeric 'input' ({exc})") from None
            label = obj.get("label")
            if label is None and isinstance(obj.get("output"), dict):
                out = obj["output"]
                label = out.get("label")
                if label is None and ("probs" in out or "logits" in out):
                    label = int(np.argmax(out.get("probs") or out.get("logits")))
            labels.append(label)
    if not rows:
        raise ReferenceError(f"{path}: no events")
    try:
        X = np.stack(rows)
    except ValueError:
        raise ReferenceError(f"{path}: input: every event must have the same input shape") from None
    y = np.asarray(labels, dtype=np.int64) if all(lab is not None for lab in labels) else None
    return X, y
