"""Each client's last queries, and how far each new query lies from them: the hot path of ``extraction``.

Per client slot (``_client_slots``), a ring of its last ``size`` queries. For
every query of a batch, the squared distance to the nearest of its client's
earlier queries (the ring, and the client's earlier rows in the same batch)
that it does not repeat exactly. PRADA's test, the near-duplicate share and
the client's spread all read these distances and rings.

The rings are stored feature-major (``ring[slot, :, j]`` is entry j): see
``_ring_dots`` for why. Checkpoints keep them entry-major ([slot, entry,
feature]), as every earlier version wrote them, under the keys ``hist``,
``hist_sq``, ``hist_len``, ``hist_rep`` and ``hist_pos``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from detectors._client_slots import group_ranks


def _client_groups(slots: np.ndarray, min_size: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Rows grouped by client, batch order kept within a group, groups padded to the next power of two.

    Yields, per group width w: ``rows`` [g, w] (padding repeats a valid row), ``valid`` [g, w] and the
    groups' ``client`` slots [g]; only the clients with at least ``min_size`` rows.
    """
    n = len(slots)
    order = np.argsort(slots, kind="stable")
    ordered = slots[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    sizes = np.diff(np.r_[starts, n])
    widths = 1 << np.ceil(np.log2(sizes)).astype(np.int64)
    widths[sizes < min_size] = 0
    for width in np.unique(widths[widths > 0]).tolist():
        pick = widths == width
        pos = np.arange(width)
        valid = pos[None, :] < sizes[pick][:, None]
        rows = order[np.minimum(starts[pick][:, None] + pos[None, :], n - 1)]
        rows = np.where(valid, rows, rows[:, :1])
        yield rows, valid, ordered[starts[pick]]


def _exact_sq(a: torch.Tensor, b: torch.Tensor, chunk_elements: int = 1 << 22) -> torch.Tensor:
    """Squared distances between paired rows, summed in float64 over their differences (no cancellation), in
    chunks of about ``chunk_elements`` values: a client of finite differences puts every pair of its batch
    here."""
    out = torch.empty(len(a), dtype=torch.float32, device=a.device)
    step = max(1, chunk_elements // max(a.shape[1], 1))
    for i in range(0, len(a), step):
        diff = a[i : i + step].double() - b[i : i + step].double()
        out[i : i + step] = (diff * diff).sum(1).float()
    return out


def _beyond(d2: torch.Tensor, exact2: float) -> torch.Tensor:
    """The squared distances, with those of exact repeats (at or under ``exact2``) made +inf."""
    return d2.masked_fill(d2 <= exact2, float("inf"))


class QueryHistory:
    """Per slot: a ring of the last ``size`` queries, their squared norms, and which entries repeat an earlier
    query exactly (within ``repeat_eps``).

    ``length`` counts a ring's filled entries and ``pos`` is where the next
    one goes; ``last`` holds each slot's newest query (NaN: none) as a
    contiguous row, read for every row of every batch, where a gather from the
    feature-major ring would touch a cache line per feature.
    """

    def __init__(self, size: int, repeat_eps: float, device: torch.device):
        self.size, self.repeat_eps, self.device = size, repeat_eps, device
        self.ring = torch.zeros((0, 0, size), device=device)
        self.ring_sq = torch.zeros((0, size), device=device)  # +inf where unfilled, so it never wins a min
        self.length = np.zeros(0, np.int64)
        self.repeat = np.zeros((0, size), bool)
        self.pos = np.zeros(0, np.int64)
        self.last = np.zeros((0, 0), np.float32)
        self._mask_cache: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------ slots
    def set_dim(self, dim: int, cap: int) -> None:
        """Shape the rings for ``dim`` features (the first batch's), over ``cap`` slots."""
        self.ring = torch.zeros((0, dim, self.size), device=self.device)
        self.last = np.full((cap, dim), np.nan, np.float32)

    def grow(self, grow: int) -> None:
        """Add ``grow`` empty slots at the end."""
        dim = self.ring.shape[1]
        self.ring = torch.cat([self.ring, torch.zeros((grow, dim, self.size), device=self.device)])
        self.ring_sq = torch.cat([self.ring_sq, torch.full((grow, self.size), float("inf"), device=self.device)])
        self.length = np.concatenate([self.length, np.zeros(grow, np.int64)])
        self.pos = np.concatenate([self.pos, np.zeros(grow, np.int64)])
        self.repeat = np.concatenate([self.repeat, np.zeros((grow, self.size), bool)])
        self.last = np.concatenate([self.last, np.full((grow, self.last.shape[1]), np.nan, np.float32)])

    def reset(self, slots: np.ndarray) -> None:
        """Empty the rings of slots given to new clients."""
        self.length[slots] = 0
        self.repeat[slots] = False
        self.ring_sq[torch.as_tensor(slots, device=self.device)] = float("inf")
        self.pos[slots] = 0
        self.last[slots] = np.nan

    # ------------------------------------------------------------ distances
    def nearest_sq(self, x: torch.Tensor, x_sq: torch.Tensor, slots: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared distance of each query to its client's nearest earlier query that it does not repeat.

        Candidates are the client's last ``size`` queries (the ring) and its
        earlier rows in this batch. Returns ``(nearest, is_repeat)``: a query
        within ``repeat_eps`` of a candidate is an exact repeat, and its
        distance is taken to the nearest candidate it does not repeat (+inf
        when there is none).

        Why it is shaped like this (the hot path of the whole agent): every
        row's distances to its client's ring come from one embedding bag over
        the whole batch (see ``_ring_dots``), and are settled for all rows at
        once. Only clients with several rows in the batch have earlier rows to
        compare with: those rows are grouped by client (batch order kept within
        a group) and groups padded to the next power of two, one batched
        product per group width: about sum(size^2) row pairs, not the n^2 of a
        Gram matrix that is nearly all masked out when a batch holds hundreds
        of clients (it grew with the batch: 2,048-row polls cost 3x per record).
        """
        dev = self.device
        # the float32 norm expansion loses ~1e-7 relative precision on |x|^2, so it cannot tell a repeat from a
        # step shorter than about sqrt(1e-6 |x|^2) (5e-3 on digits; ZOO's finite differences step 1e-4): the
        # pairs it puts that close are measured again exactly, and repeats are judged by `repeat_eps` itself
        loose2 = self.repeat_eps ** 2 + 1e-6 * x_sq
        exact2 = self.repeat_eps ** 2
        slots_t = torch.as_tensor(slots, device=dev)
        # unfilled ring entries hold |h|^2 = +inf, so they never win the min
        ring = (x_sq[:, None] + self.ring_sq[slots_t]).sub_(self._ring_dots(x, slots_t), alpha=2)  # [n, size]
        nearest = ring.amin(1)  # to any candidate
        if bool((nearest <= loose2).any()):  # retries, finite differences: exact distances where unresolved
            self._resolve_close_pairs(ring[:, None, :], x[:, None, :], nearest[:, None], loose2[:, None], slots)
            nearest = ring.amin(1)
        peer_groups = []  # (rows, valid, peers): earlier rows of the same client in this batch, [g, w], [g, w, w]
        for rows, valid, _ in _client_groups(slots, min_size=2):
            rows_t, valid_t = torch.as_tensor(rows, device=dev), torch.as_tensor(valid, device=dev)
            xg, sq = x[rows_t], x_sq[rows_t]                                                      # [g, w, d], [g, w]
            peers = torch.baddbmm(sq[:, :, None] + sq[:, None, :], xg, xg.transpose(1, 2), alpha=-2)
            peers.masked_fill_(~valid_t[:, None, :] | self._not_earlier(rows.shape[1]), float("inf"))
            near, close = peers.amin(-1), loose2[rows_t]
            if bool((near <= close).any()):
                self._resolve_close_pairs(peers, xg, near, close)
                near = peers.amin(-1)
            keep = torch.as_tensor(rows[valid], device=dev)
            nearest[keep] = torch.minimum(nearest[keep], near[valid_t])
            peer_groups.append((rows, valid, peers))
        is_repeat = nearest <= exact2
        distinct = nearest  # to any candidate the query does not repeat
        rep = torch.nonzero(is_repeat)[:, 0]
        if len(rep):  # a repeat's distance is to the nearest candidate it does not repeat
            distinct = nearest.clone()
            distinct[rep] = _beyond(ring[rep], exact2).amin(1)
            repeats = is_repeat.cpu().numpy()
            for rows, valid, peers in peer_groups:
                g, w = np.nonzero(valid & repeats[rows])
                if len(g):
                    r = torch.as_tensor(rows[g, w], device=dev)
                    g_t, w_t = torch.as_tensor(g, device=dev), torch.as_tensor(w, device=dev)
                    distinct[r] = torch.minimum(distinct[r], _beyond(peers[g_t, w_t], exact2).amin(1))
        return distinct, is_repeat

    def _resolve_close_pairs(self, cand: torch.Tensor, xg: torch.Tensor, near: torch.Tensor, close: torch.Tensor,
                             ring_slots: np.ndarray | None = None, numpy_path: bool | None = None) -> None:
        """Replace, in place, the candidate squared distances at or under ``close`` (per row) by exact ones.

        ``cand`` [g, w, c] holds, for the rows ``xg`` [g, w, d], the distances
        to the entries of the rings of ``ring_slots`` [g] (when given) or else
        to the rows of the same group; only rows whose ``near``est candidate
        is that close are looked at. On CPU in numpy (``numpy_path`` None: by
        device): these are a few small gathers, where torch's per-call
        overhead cost a tenth of the detector's time.
        """
        if xg.device.type == "cpu" if numpy_path is None else numpy_path:
            rows, hist, limit, cn = xg.numpy(), self.ring.numpy(), close.numpy(), cand.numpy()  # hist[slot, :, entry]
            gr, wr = np.nonzero(near.numpy() <= limit)
            r, j = np.nonzero(cn[gr, wr] <= limit[gr, wr][:, None])
            g, w = gr[r], wr[r]
            diff = rows[g, w].astype(np.float64) - (hist[ring_slots[g], :, j] if ring_slots is not None else rows[g, j])
            cn[g, w, j] = np.einsum("ij,ij->i", diff, diff)
            return
        gr, wr = torch.nonzero(near <= close).unbind(1)
        r, j = torch.nonzero(cand[gr, wr] <= close[gr, wr][:, None]).unbind(1)
        g, w = gr[r], wr[r]
        other = (self.ring[torch.as_tensor(ring_slots, device=xg.device)[g], :, j] if ring_slots is not None
                 else xg[g, j])
        cand[g, w, j] = _exact_sq(xg[g, w], other)

    def _ring_dots(self, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """[n, size] dot products of each row with every entry of its client's ring.

        Why an embedding bag: the rings are stored feature-major ([slot,
        feature, entry]), so row i's dot products are the sum of its client's d
        feature rows weighted by x_i, which ``embedding_bag`` computes reading
        each of those rows once. Gathering whole rings into a [rows, size, d]
        copy and multiplying that was the detector's largest cost: a batch of
        512 rows from 500 clients touches 8 MB of rings, and the copy read and
        wrote it once more than the product needs (measured on CPU: 1.1 vs 0.7
        ms per batch with the rings out of cache).
        """
        d = x.shape[1]
        bags = slots[:, None] * d + torch.arange(d, device=x.device)  # [n, d] rows of the flattened rings
        return F.embedding_bag(bags, self.ring.view(-1, self.size), mode="sum", per_sample_weights=x)

    def _not_earlier(self, n: int) -> torch.Tensor:
        """[n, n] mask of (i, j) with j >= i: row i may only look at earlier rows of the batch."""
        mask = self._mask_cache.get("triu")
        if mask is None or len(mask) < n:  # one mask of the largest size seen; smaller ones are its corner
            mask = torch.ones(n, n, dtype=torch.bool, device=self.device).triu(0)
            self._mask_cache = {"triu": mask}
        return mask[:n, :n]

    # ------------------------------------------------------------ writing and reading
    def push(self, x: torch.Tensor, x_sq: torch.Tensor, slots: np.ndarray, is_repeat: np.ndarray,
             X: np.ndarray) -> None:
        """Write a batch's rows (``x`` on the device, ``X`` as received) into their clients' rings, in order."""
        H = self.size
        ranks = group_ranks(slots)
        per_slot = np.bincount(slots, minlength=len(self.length))
        newest = np.flatnonzero(ranks == per_slot[slots] - 1)
        self.last[slots[newest]] = np.asarray(X, np.float32)[newest]
        keep = ranks >= per_slot[slots] - H  # only the last H rows of a client matter
        rows = np.flatnonzero(keep)
        pos = (self.pos[slots[rows]] + ranks[rows]) % H
        dev = self.device
        s_t = torch.as_tensor(slots[rows], device=dev)
        p_t = torch.as_tensor(pos, device=dev)
        r_t = torch.as_tensor(rows, device=dev)
        self.ring[s_t, :, p_t] = x[r_t]
        self.ring_sq[s_t, p_t] = x_sq[r_t]
        self.repeat[slots[rows], pos] = is_repeat[rows]
        touched = np.flatnonzero(per_slot)
        self.pos[touched] = (self.pos[touched] + per_slot[touched]) % H
        self.length[touched] = np.minimum(self.length[touched] + per_slot[touched], H)

    def spreads(self, slots: np.ndarray, min_rows: int) -> np.ndarray:
        """RMS distance of each slot's distinct ring entries to their mean (``_benign_clients.spread``), NaN
        with fewer than ``min_rows`` of them; in float64, as masked sums over the whole rings (one pass for
        every slot)."""
        use = (np.arange(self.size)[None, :] < self.length[slots][:, None]) & ~self.repeat[slots]
        k = use.sum(1)
        out = np.full(len(slots), np.nan)
        enough = np.flatnonzero(k >= min_rows)
        if len(enough):
            dev = self.ring.device
            rings = self.ring[torch.as_tensor(slots[enough], device=dev)].double()  # [m, d, size], a copy
            weight = torch.as_tensor(use[enough], dtype=torch.float64, device=dev)[:, None, :]
            k_t = torch.as_tensor(k[enough], dtype=torch.float64, device=dev)
            # in place on the copy: a batch's due clients are dozens of [d x size] rings, and each fresh
            # temporary was one more pass over them (this was half the tests' time)
            mean = rings.mul_(weight).sum(2, keepdim=True).div_(k_t[:, None, None])
            centred = rings.sub_(mean).mul_(weight)
            out[enough] = torch.sqrt(centred.mul_(centred).sum((1, 2)) / k_t).cpu().numpy()
        return out

    def recent(self, s: int) -> np.ndarray:
        """Slot s's ring (its last ``size`` queries), oldest first, exact repeats left out."""
        n, pos, H = int(self.length[s]), int(self.pos[s]), self.size
        idx = np.arange(pos - n, pos) % H
        idx = idx[~self.repeat[s, idx]]
        return self.ring[s][:, torch.as_tensor(idx, device=self.ring.device)].T.cpu().numpy()

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"hist": self.ring.transpose(1, 2).cpu().numpy(),  # entry-major [slot, entry, feature]
                "hist_sq": self.ring_sq.cpu().numpy(), "hist_len": self.length, "hist_rep": self.repeat,
                "hist_pos": self.pos}

    def load_state_dict(self, state: dict[str, Any], dim: int | None) -> None:
        dev = self.device
        self.ring = torch.as_tensor(np.asarray(state["hist"], np.float32), device=dev).transpose(1, 2).contiguous()
        self.ring_sq = torch.as_tensor(np.asarray(state["hist_sq"], np.float32), device=dev).clone()
        self.length = np.array(state["hist_len"])
        self.repeat = np.array(state["hist_rep"])
        self.pos = np.array(state["hist_pos"])
        self.last = np.full((len(self.length), dim or 0), np.nan, np.float32)
        filled = np.flatnonzero(self.length > 0)
        self.last[filled] = self.ring.cpu().numpy()[filled, :, (self.pos[filled] - 1) % self.size]
