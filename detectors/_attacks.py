"""Evasion attacks in plain torch, batched: the adversarial detector trains on them, the scenarios test with them.

All white-box attacks take ``logits_fn`` (flat float inputs [n, d] -> logits
[n, k]), work on a whole batch at once, clip to the valid input box
``[lo, hi]`` and return flat float32 tensors. They follow the original papers:

* FGSM (Goodfellow et al. 2015), one signed-gradient step of size eps (L∞).
* PGD-L∞ / PGD-L2 (Madry et al. 2018), random start, projected steps.
* DeepFool (Moosavi-Dezfooli et al. 2016), minimal L2 step to the nearest
  linearised boundary, with overshoot.
* Carlini-Wagner L2 (2017), tanh box, Adam on ``||δ||² + c·f(x+δ)``.
* SimBA (Guo et al. 2019), black-box: only output probabilities, one query per
  step, random pixel-basis directions; every query is returned so that the
  scenario can replay them as traffic.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def _grad(logits_fn: LogitsFn, x: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    loss = loss_fn(logits_fn(x))
    (g,) = torch.autograd.grad(loss, x)
    return g


def fgsm(logits_fn: LogitsFn, x: torch.Tensor, y: torch.Tensor, eps: float, lo: float, hi: float) -> torch.Tensor:
    g = _grad(logits_fn, x, lambda z: F.cross_entropy(z, y, reduction="sum"))
    return (x + eps * g.sign()).clamp(lo, hi).detach()


def pgd_linf(logits_fn: LogitsFn, x: torch.Tensor, y: torch.Tensor, eps: float, lo: float, hi: float,
             steps: int = 20, step_size: float | None = None, seed: int = 0) -> torch.Tensor:
    step_size = step_size or 2.5 * eps / steps
    gen = torch.Generator(device="cpu").manual_seed(seed)
    start = (torch.rand(x.shape, generator=gen) * 2 - 1).to(x.device) * eps
    adv = (x + start).clamp(lo, hi)
    for _ in range(steps):
        g = _grad(logits_fn, adv, lambda z: F.cross_entropy(z, y, reduction="sum"))
        adv = adv + step_size * g.sign()
        adv = torch.min(torch.max(adv, x - eps), x + eps).clamp(lo, hi).detach()
    return adv


def _l2_normalise(v: torch.Tensor) -> torch.Tensor:
    return v / v.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (v.dim() - 1)))


def pgd_l2(logits_fn: LogitsFn, x: torch.Tensor, y: torch.Tensor, eps: float, lo: float, hi: float,
           steps: int = 20, step_size: float | None = None, seed: int = 0) -> torch.Tensor:
    step_size = step_size or 2.5 * eps / steps
    gen = torch.Generator(device="cpu").manual_seed(seed)
    start = _l2_normalise(torch.randn(x.shape, generator=gen)).to(x.device) * eps * 0.5
    adv = (x + start).clamp(lo, hi)
    for _ in range(steps):
        g = _grad(logits_fn, adv, lambda z: F.cross_entropy(z, y, reduction="sum"))
        adv = adv + step_size * _l2_normalise(g)
        delta = adv - x
        norm = delta.flatten(1).norm(dim=1, keepdim=True).clamp_min(1e-12)
        delta = delta * torch.clamp(eps / norm, max=1.0)
        adv = (x + delta).clamp(lo, hi).detach()
    return adv


def deepfool(logits_fn: LogitsFn, x: torch.Tensor, lo: float, hi: float, steps: int = 30,
             overshoot: float = 0.02) -> torch.Tensor:
    """Iterate minimal L2 steps to the closest linearised class boundary until the label flips."""
    with torch.no_grad():
        y0 = logits_fn(x).argmax(1)
    n_classes = int(logits_fn(x[:1]).shape[1])
    delta = torch.zeros_like(x)
    active = torch.ones(len(x), dtype=torch.bool, device=x.device)
    for _ in range(steps):
        xa = (x + (1 + overshoot) * delta).clamp(lo, hi).detach().requires_grad_(True)
        logits = logits_fn(xa)
        active = active & (logits.argmax(1) == y0)
        if not bool(active.any()):
            break
        grads = torch.stack([torch.autograd.grad(logits[:, k].sum(), xa, retain_graph=True)[0]
                             for k in range(n_classes)], dim=1)  # [n, k, d]
        f0 = logits.gather(1, y0[:, None])
        g0 = grads[torch.arange(len(x)), y0][:, None, :]
        w = grads - g0
        f = (logits - f0).detach()
        dist = f.abs() / w.flatten(2).norm(dim=2).clamp_min(1e-8)
        dist[torch.arange(len(x)), y0] = float("inf")
        best = dist.argmin(1)
        wb = w[torch.arange(len(x)), best]
        rb = (dist[torch.arange(len(x)), best] + 1e-4)[:, None] * _l2_normalise(wb)
        delta = delta + rb.detach() * active[:, None].float()
    return (x + (1 + overshoot) * delta).clamp(lo, hi).detach()


def cw_l2(logits_fn: LogitsFn, x: torch.Tensor, y: torch.Tensor, lo: float, hi: float, c: float = 1.0,
          kappa: float = 0.0, steps: int = 100, lr: float = 0.05) -> torch.Tensor:
    """Carlini-Wagner L2 with a fixed trade-off ``c``; keeps the smallest successful perturbation found."""
    span = hi - lo
    to_w = lambda a: torch.atanh(((a - lo) / span * 2 - 1).clamp(-1 + 1e-6, 1 - 1e-6))  # noqa: E731
    from_w = lambda w: lo + (torch.tanh(w) + 1) / 2 * span  # noqa: E731
    w = to_w(x).detach().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    best = x.clone()
    best_norm = torch.full((len(x),), float("inf"), device=x.device)
    onehot = F.one_hot(y, int(logits_fn(x[:1]).shape[1])).bool()
    for _ in range(steps):
        adv = from_w(w)
        logits = logits_fn(adv)
        real = logits[onehot]
        other = logits.masked_fill(onehot, -1e9).max(1).values
        f = torch.clamp(real - other + kappa, min=0)
        norm = (adv - x).pow(2).flatten(1).sum(1)
        loss = (norm + c * f).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            ok = (logits.argmax(1) != y) & (norm < best_norm)
            best[ok] = adv[ok].detach()
            best_norm[ok] = norm[ok]
    return best.detach()


def simba(query_proba: Callable[[np.ndarray], np.ndarray], x: np.ndarray, y: np.ndarray, eps: float,
          lo: float, hi: float, max_steps: int = 300, seed: int = 0
          ) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """SimBA with the pixel basis, vectorised over seeds but one query per seed per call.

    Returns (final adversarials [n, d], queries per round, seed index per round):
    each round's queries are what the attacker sends the model, in order.
    """
    rng = np.random.default_rng(seed)
    n, d = x.shape
    adv = x.astype(np.float32).copy()
    probs0 = query_proba(adv)
    p_true = probs0[np.arange(n), y]
    queries, owners = [adv.copy()], [np.arange(n)]
    order = np.stack([rng.permutation(d) for _ in range(n)])
    done = probs0.argmax(1) != y
    for step in range(max_steps):
        live = np.flatnonzero(~done)
        if len(live) == 0:
            break
        coord = order[live, step % d]
        for sign in (-1.0, 1.0):
            cand = adv[live].copy()
            cand[np.arange(len(live)), coord] = np.clip(cand[np.arange(len(live)), coord] + sign * eps, lo, hi)
            probs = query_proba(cand)
            queries.append(cand.copy())
            owners.append(live.copy())
            better = probs[np.arange(len(live)), y[live]] < p_true[live]
            take = live[better]
            adv[take] = cand[better]
            p_true[take] = probs[better, y[take]]
            done[take] = probs[better].argmax(1) != y[take]
            live = live[~better]
            coord = coord[~better]
            if len(live) == 0:
                break
    return adv, queries, owners
