"""The monitored model, as white-box detectors see it.

Either the user's own ``torch.export`` program (``.pt2``; CONTRACT.md "Model
artifacts": never unpickled) or, when none is given, a surrogate MLP trained on
the reference data and exported the same way, so the rest of the code sees one
kind of thing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn


@dataclass
class WatchedModel:
    """A differentiable classifier: flat float32 inputs [n, d] -> logits [n, k]."""

    module: nn.Module
    input_shape: tuple[int, ...]
    n_classes: int
    device: torch.device
    is_surrogate: bool

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for flat inputs; reshapes to the model's own input shape."""
        return self.module(x.reshape(len(x), *self.input_shape))

    @torch.no_grad()
    def predict_proba(self, X: np.ndarray, batch: int = 4096) -> np.ndarray:
        out = []
        for i in range(0, len(X), batch):
            xb = torch.as_tensor(X[i : i + batch], dtype=torch.float32, device=self.device)
            out.append(torch.softmax(self.logits(xb), dim=1).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.n_classes), np.float32)

    def save(self, path: str | Path) -> None:
        """Export as a ``torch.export`` program (the only model format we load)."""
        example = torch.zeros((2, *self.input_shape), device=self.device)
        batch = torch.export.Dim("batch", min=1)
        program = torch.export.export(self.module.eval(), (example,), dynamic_shapes=({0: batch},))
        torch.export.save(program, str(path))

    @classmethod
    def load(cls, path: str | Path, input_shape: tuple[int, ...], n_classes: int | None,
             device: torch.device, is_surrogate: bool = False) -> WatchedModel:
        program = torch.export.load(str(path))
        module = program.module().to(device)
        if n_classes is None:
            with torch.no_grad():
                n_classes = int(module(torch.zeros((2, *input_shape), device=device)).shape[1])
        return cls(module, tuple(input_shape), n_classes, device, is_surrogate)


class SurrogateMLP(nn.Module):
    """Two hidden layers: enough to be a faithful stand-in for tabular and digit models."""

    def __init__(self, dim: int, n_classes: int, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, n_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def train_classifier(X: np.ndarray, y: np.ndarray, input_shape: tuple[int, ...], device: torch.device,
                     epochs: int = 60, seed: int = 0, module: nn.Module | None = None) -> WatchedModel:
    """Fit a classifier on (X, y) with Adam; used for surrogates and the demo's model service."""
    torch.manual_seed(seed)
    n_classes = int(y.max()) + 1
    module = (module or SurrogateMLP(int(np.prod(input_shape)), n_classes)).to(device)
    opt = torch.optim.Adam(module.parameters(), lr=2e-3, weight_decay=1e-4)
    Xt = torch.as_tensor(X, dtype=torch.float32, device=device).reshape(len(X), *input_shape)
    yt = torch.as_tensor(y, dtype=torch.long, device=device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    module.train()
    for _ in range(epochs):
        perm = torch.randperm(len(Xt), generator=gen).to(device)
        for i in range(0, len(perm), 128):
            b = perm[i : i + 128]
            opt.zero_grad()
            nn.functional.cross_entropy(module(Xt[b]), yt[b]).backward()
            opt.step()
    module.eval()
    return WatchedModel(module, tuple(input_shape), n_classes, device, is_surrogate=True)
