"""Fitting detectors (``inferwatch train``) and loading them back for ``run``.

``train`` writes one pickle-free file per detector, the monitored model (or its
surrogate) as ``model.pt2``, and ``manifest.json`` with a sha256 per file plus
the input shape and class count taken from the data and the model, so a config
needs neither. ``load_detectors`` verifies every hash before using anything.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from agent.config import AgentConfig
from agent.device import resolve_device
from agent.model import WatchedModel, train_classifier
from agent.reference import ReferenceData, ReferenceError, load_reference
from agent.state import ArtifactError, load_tree, read_manifest, save_tree, sha256_file, write_manifest
from detectors.base import Detector, DetectorContext, registry

log = logging.getLogger(__name__)
MODEL_FILE = "model.pt2"


def enabled_detectors(cfg: AgentConfig) -> dict[str, tuple[type[Detector], Any]]:
    """Detectors named in the config with ``enabled: true``, in priority order."""
    reg = registry()
    return {name: (cls, cfg.detector_options[name]) for name, cls in reg.items()
            if name in cfg.detector_options and cfg.detector_options[name].enabled}


def train(cfg: AgentConfig, reference_path: str | Path, model_path: str | Path | None = None,
          out_dir: Path | None = None) -> dict[str, Any]:
    """Fit every enabled detector on the reference data; returns the manifest written."""
    device = resolve_device(cfg.device)
    ref = load_reference(reference_path)
    out = Path(out_dir or cfg.artifacts)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.npz"):
        stale.unlink()
    dets = enabled_detectors(cfg)
    model: WatchedModel | None = None
    if model_path is not None:
        model = WatchedModel.load(model_path, ref.input_shape, ref.n_classes, device)
        shutil.copyfile(model_path, out / MODEL_FILE)
    elif any(cls.needs_model for cls, _ in dets.values()):
        if ref.y is None:
            raise ReferenceError(f"{reference_path}: y: detectors {[n for n, (c, _) in dets.items() if c.needs_model]} "
                                 "need a model; give --model MODEL.pt2 or labels y to train a surrogate")
        log.info("no --model given: training a surrogate classifier on the reference data")
        model = train_classifier(ref.X, ref.y, ref.input_shape, device)
        model.save(out / MODEL_FILE)
    n_classes = model.n_classes if model else ref.n_classes
    context = DetectorContext(device=device, input_shape=ref.input_shape, n_classes=n_classes, model=model)
    for name, (cls, opts) in dets.items():
        det = cls(opts, context)
        t0 = time.perf_counter()
        if cls.requires_fit:
            det.fit(ref)
        save_tree(out / f"{name}.npz", det.artifacts())
        log.info("fitted %s in %.1f s", name, time.perf_counter() - t0)
    info = {
        "inferwatch": "artifacts/1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "input_shape": list(ref.input_shape),
        "n_classes": n_classes,
        "model": MODEL_FILE if model else None,
        "model_is_surrogate": bool(model and model_path is None),
        "detectors": list(dets),
        "reference": {"path": str(reference_path), "rows": len(ref.X), "sha256": sha256_file(reference_path)},
    }
    write_manifest(out, info)
    return read_manifest(out)


def load_detectors(cfg: AgentConfig) -> tuple[list[Detector], DetectorContext]:
    """Build the enabled detectors with their fitted artifacts, after verifying the manifest."""
    device = resolve_device(cfg.device)
    dets = enabled_detectors(cfg)
    needs_artifacts = any(cls.requires_fit or cls.needs_model for cls, _ in dets.values())
    manifest: dict[str, Any] = {}
    if needs_artifacts or (Path(cfg.artifacts) / "manifest.json").is_file():
        manifest = read_manifest(cfg.artifacts)  # raises ArtifactError on any hash mismatch
    shape = tuple(manifest["input_shape"]) if manifest.get("input_shape") else None
    model = None
    if manifest.get("model"):
        model = WatchedModel.load(Path(cfg.artifacts) / manifest["model"], shape, manifest.get("n_classes"), device,
                                  is_surrogate=manifest.get("model_is_surrogate", False))
    context = DetectorContext(device=device, input_shape=shape, n_classes=manifest.get("n_classes"), model=model)
    built = []
    for name, (cls, opts) in dets.items():
        det = cls(opts, context)
        path = Path(cfg.artifacts) / f"{name}.npz"
        if cls.requires_fit:
            if path.name not in manifest.get("files", {}):
                raise ArtifactError(f"{path}: detector {name} is enabled but was not trained; "
                                    f"run `inferwatch train -c CONFIG --reference DATA`")
            det.load_artifacts(load_tree(path))
        built.append(det)
    return built, context


def reference_from_arrays(X: np.ndarray, y: np.ndarray | None, input_shape: tuple[int, ...]) -> ReferenceData:
    return ReferenceData(X=X.reshape(len(X), -1).astype(np.float32), y=y, input_shape=input_shape)
