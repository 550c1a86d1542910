"""Bounded per-client slot table shared by detectors that keep state per client.

Per-client state lives in preallocated arrays indexed by a *slot*, so a batch's
work is one vectorised gather/scatter instead of a Python loop over clients.
This table maps client ids to slots, evicts the least recently seen client when
``max_clients`` is reached (its slot is reused), and counts evictions so an
operator can see when the bound is too small for the traffic.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np


class ClientSlots:
    """LRU map client id -> slot in ``[0, max_clients)``."""

    def __init__(self, max_clients: int):
        if max_clients < 1:
            raise ValueError(f"max_clients must be >= 1, got {max_clients}")
        self.max_clients = max_clients
        self._slot_of: OrderedDict[str, int] = OrderedDict()
        self._free: list[int] = []
        self._next = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._slot_of)

    @property
    def high_water(self) -> int:
        """Number of slots ever handed out: arrays need at least this many rows."""
        return self._next

    def assign(self, clients: Sequence[str]) -> tuple[np.ndarray, list[int]]:
        """Slots for each row, plus the slots that were (re)issued fresh in this call.

        Fresh slots belong to clients never seen before (or evicted and back):
        their state must be reset by the caller before use. The clients of the
        current call are never evicted by each other unless the batch alone has
        more distinct clients than ``max_clients``.
        """
        slots = np.empty(len(clients), dtype=np.int64)
        fresh: list[int] = []
        cache: dict[str, int] = {}
        for i, client in enumerate(clients):
            slot = cache.get(client)
            if slot is None:
                slot = self._slot_of.get(client)
                if slot is None:
                    slot = self._take_slot()
                    fresh.append(slot)
                    self._slot_of[client] = slot
                else:
                    self._slot_of.move_to_end(client)
                cache[client] = slot
            slots[i] = slot
        return slots, fresh

    def _take_slot(self) -> int:
        if self._free:
            return self._free.pop()
        if self._next < self.max_clients:
            self._next += 1
            return self._next - 1
        _, slot = self._slot_of.popitem(last=False)  # least recently seen
        self.evictions += 1
        return slot

    def client_of(self) -> dict[int, str]:
        return {slot: client for client, slot in self._slot_of.items()}

    def state_dict(self) -> dict:
        return {
            "clients": list(self._slot_of.keys()),
            "slots": np.asarray(list(self._slot_of.values()), dtype=np.int64),
            "free": np.asarray(self._free, dtype=np.int64),
            "next": self._next,
            "evictions": self.evictions,
        }

    def load_state_dict(self, state: dict) -> None:
        self._slot_of = OrderedDict(zip(state["clients"], (int(s) for s in state["slots"])))
        self._free = [int(s) for s in state["free"]]
        self._next = int(state["next"])
        self.evictions = int(state["evictions"])


def group_ranks(slots: np.ndarray) -> np.ndarray:
    """Position of each row among the rows of the same slot, in batch order (0, 1, 2...)."""
    order = np.argsort(slots, kind="stable")
    sorted_slots = slots[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_slots)) + 1]
    run_start = np.repeat(starts, np.diff(np.r_[starts, len(slots)]))
    ranks = np.empty(len(slots), dtype=np.int64)
    ranks[order] = np.arange(len(slots)) - run_start
    return ranks
