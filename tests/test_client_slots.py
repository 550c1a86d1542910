"""The per-client slot table shared by the extraction, adversarial and rate detectors."""

from __future__ import annotations

from collections import OrderedDict

from hypothesis import given, settings
from hypothesis import strategies as st

from detectors._client_slots import ClientSlots


def one_client_at_a_time(batches: list[list[str]], max_clients: int) -> list[tuple[list[int], list[int], list[str]]]:
    """What ``assign`` promises, spelled out: each distinct client of a batch, in order of first appearance, is
    looked up (and made the most recent) or given a slot (a never-used one, else the least recent client's)."""
    table: OrderedDict[str, int] = OrderedDict()
    used, out = 0, []
    for batch in batches:
        fresh, slot_of = [], {}
        for client in dict.fromkeys(batch):
            if client in table:
                table.move_to_end(client)
            else:
                if used < max_clients:
                    slot, used = used, used + 1
                else:
                    _, slot = table.popitem(last=False)
                fresh.append(slot)
                table[client] = slot
            slot_of[client] = table[client]
        out.append(([slot_of[c] for c in batch], fresh, list(table)))
    return out


@given(st.lists(st.lists(st.sampled_from("abcdefgh"), min_size=1, max_size=12), max_size=12), st.integers(1, 9))
@settings(max_examples=300, deadline=None)
def test_assign_is_one_lookup_per_distinct_client_in_order(batches: list[list[str]], max_clients: int) -> None:
    """Slots, fresh slots and the least-recently-seen order, batch after batch, with evictions."""
    table = ClientSlots(max_clients)
    for batch, (slots, fresh, order) in zip(batches, one_client_at_a_time(batches, max_clients), strict=True):
        if len(set(batch)) > max_clients:
            return  # clients of one batch evicting each other: not a promise either way
        got, got_fresh = table.assign(batch)
        assert got.tolist() == slots and got_fresh == fresh
        assert list(table.state_dict()["clients"]) == order
