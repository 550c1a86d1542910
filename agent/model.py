"""The monitored model, as white-box detectors see it.

Either the user's own ``torch.export`` program (``.pt2``; CONTRACT.md "Model
artifacts": never unpickled) or, when none is given, a surrogate MLP trained on
the reference data and exported the same way, so the rest of the code sees one
kind of thing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

# ops that pass the logits through unchanged in meaning (a model that ends in softmax still has a logit layer)
_PASS_THROUGH = {"softmax", "_softmax", "log_softmax", "_log_softmax", "dropout", "clone", "view", "reshape",
                 "_to_copy", "contiguous", "alias", "identity"}

@dataclass
class WatchedModel:
    """A differentiable classifier: flat float32 inputs [n, d] -> logits [n, k]."""

    module: nn.Module
    input_shape: tuple[int, ...]
    n_classes: int
    device: torch.device
    is_surrogate: bool
    _with_hidden: nn.Module | None = field(default=None, init=False, repr=False, compare=False)
    _hidden_tried: bool = field(default=False, init=False, repr=False, compare=False)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for flat inputs; reshapes to the model's own input shape."""
        return self.module(x.reshape(len(x), *self.input_shape))

    def logits_and_hidden(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits and the penultimate representation (the input of the final linear layer), from one pass.

        Hidden-layer statistics (Lee et al., "A simple unified framework for
        detecting out-of-distribution samples and adversarial attacks", 2018)
        need the layer before the logits. A ``torch.export`` program has no
        hooks, so its graph is rewritten to return that node as well (see
        :func:`penultimate_view`). ``None`` when the model has no final
        linear layer to read: the features that need it are then constant.
        """
        if not self._hidden_tried:
            self._hidden_tried = True
            with torch.inference_mode(False):  # its parameters must stay usable by autograd (adaptive attacks)
                self._with_hidden = penultimate_view(self.module, self.input_shape, self.device)
        flat = x.reshape(len(x), *self.input_shape)
        if self._with_hidden is None:
            return self.module(flat), None
        logits, hidden = self._with_hidden(flat)
        return logits, hidden.reshape(len(x), -1)

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


def penultimate_view(module: nn.Module, input_shape: tuple[int, ...], device: torch.device) -> nn.Module | None:
    """A copy of ``module`` as an FX graph that returns ``(logits, penultimate activation)``, or None.

    The logits node is found by walking back from the graph's output through
    ops that keep the logits' meaning (softmax, dropout, views); it must be a
    linear layer (``aten.linear`` / ``addmm``), whose input is the
    representation. A module that is not yet a graph (a surrogate in memory)
    is exported first, as :meth:`WatchedModel.save` does.
    """
    gm = module
    if not isinstance(module, torch.fx.GraphModule):
        try:
            example = torch.zeros((2, *input_shape), device=device)
            program = torch.export.export(module.eval(), (example,),
                                          dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
            gm = program.module()
        except Exception as exc:  # noqa: BLE001 — any export failure means: no hidden view, say why
            log.warning("model: cannot export it to read its penultimate layer (%s); hidden-layer features off", exc)
            return None
    out = next(n for n in gm.graph.nodes if n.op == "output")
    logits = node = out.args[0][0] if isinstance(out.args[0], (tuple, list)) else out.args[0]
    while isinstance(node, torch.fx.Node) and node.op == "call_function":
        op = getattr(node.target, "__name__", str(node.target)).split(".")[0]
        if op == "linear":
            hidden = node.args[0]
            break
        if op == "addmm":
            hidden = node.args[1]
            break
        if op not in _PASS_THROUGH:
            node = None
            break
        node = node.args[0]
    else:
        node = None
    if node is None or not isinstance(hidden, torch.fx.Node):
        log.warning("model: no final linear layer found before its output; hidden-layer features off")
        return None
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for n in gm.graph.nodes:
        if n.op == "output":
            graph.output((env[logits], env[hidden]))
        else:
            env[n] = graph.node_copy(n, lambda a: env[a])
    view = torch.fx.GraphModule(gm, graph)
    return view.to(device).eval()


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
