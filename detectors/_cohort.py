"""The queries of clients too new to be judged on their own, pooled: the cohort extraction tests as one.

Why: every per-client test needs ``min_queries`` of a client's queries, so an
attacker who spreads a campaign over many client ids (API keys, accounts, source
addresses), each sending fewer, is never tested at all. PRADA's authors name
colluding clients as its limit. Pooled, the new clients' queries are a sample
like any client's window; benign new clients draw the same inputs as
established ones, so the pool's rates sit at the population's, while a
distributed campaign lifts them. A ring of the last ``size`` such queries:
their per-query flags (the same bits as a client's window), clients and record
ids.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class NewClientCohort:
    """Ring of the last ``size`` non-repeat queries from clients not yet established, oldest overwritten."""

    def __init__(self, size: int):
        self.size = size
        self.clear()

    def clear(self) -> None:
        """Empty the ring."""
        size = self.size
        self.flags = np.zeros(size, np.uint8)
        self.clients = np.empty(size, object)
        self.ids = np.empty(size, object)
        self.pos = 0  # next write position
        self.length = 0  # filled entries
        self.since_check = 0  # entries pushed since the last test

    def push(self, flags: np.ndarray, clients: np.ndarray, ids: np.ndarray) -> None:
        """Append rows (arrays of equal length), keeping the newest ``size``."""
        n = len(flags)
        if n == 0:
            return
        keep = slice(max(0, n - self.size), n)
        flags, clients, ids = flags[keep], clients[keep], ids[keep]
        at = (self.pos + np.arange(len(flags))) % self.size
        self.flags[at], self.clients[at], self.ids[at] = flags, clients, ids
        self.pos = int((self.pos + len(flags)) % self.size)
        self.length = min(self.size, self.length + len(flags))
        self.since_check += n

    def window(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(flags, clients, ids) of the filled part, oldest first."""
        idx = np.arange(self.pos - self.length, self.pos) % self.size
        return self.flags[idx], self.clients[idx], self.ids[idx]

    def window_flags(self) -> np.ndarray:
        """The flags of the filled part, in ring order: what the tests count, without gathering the rest."""
        return self.flags[: self.length]

    def state_dict(self) -> dict[str, Any]:
        flags, clients, ids = self.window()
        return {"flags": flags.copy(), "clients": clients.tolist(), "ids": ids.tolist(),
                "since_check": self.since_check}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clear()
        flags = np.asarray(state["flags"], np.uint8)
        self.push(flags, np.asarray(list(state["clients"]), object), np.asarray(list(state["ids"]), object))
        self.since_check = int(state["since_check"])
