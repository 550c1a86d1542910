"""ReferenceData.folds: the cross-fitting cut that lets every reference row be scored by a detector fitted
without it (``adversarial`` fits and calibrates on it)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.reference import ReferenceData


def _reference(n: int, labelled: bool) -> ReferenceData:
    X = np.arange(n * 3, dtype=np.float32).reshape(n, 3)  # row i starts with 3i: its id
    return ReferenceData(X, np.arange(n, dtype=np.int64) % 4 if labelled else None, (3,))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 200), data=st.data(), labelled=st.booleans(), seed=st.integers(0, 2**31))
def test_every_row_is_held_out_exactly_once_and_never_in_its_own_rest(n, data, labelled, seed) -> None:
    k = data.draw(st.integers(2, n))
    ref = _reference(n, labelled)
    folds = ref.folds(k, seed=seed)
    assert len(folds) == k
    held_ids = [(held.X[:, 0] / 3).astype(int) for _, held in folds]
    assert sorted(np.concatenate(held_ids).tolist()) == list(range(n))
    sizes = [len(h) for h in held_ids]
    assert max(sizes) - min(sizes) <= 1  # near-equal folds
    for (rest, held), ids in zip(folds, held_ids):
        rest_ids = (rest.X[:, 0] / 3).astype(int)
        assert set(rest_ids.tolist()).isdisjoint(ids.tolist())
        assert len(rest_ids) + len(ids) == n
        for part, part_ids in ((rest, rest_ids), (held, ids)):
            assert part.input_shape == (3,)
            if labelled:
                np.testing.assert_array_equal(part.y, part_ids % 4)  # labels travel with their rows
            else:
                assert part.y is None


def test_the_same_seed_cuts_the_same_folds_and_another_seed_others() -> None:
    ref = _reference(50, True)
    a, b, c = ref.folds(5, seed=1), ref.folds(5, seed=1), ref.folds(5, seed=2)
    assert all(np.array_equal(x[1].X, y[1].X) for x, y in zip(a, b))
    assert not all(np.array_equal(x[1].X, y[1].X) for x, y in zip(a, c))


@pytest.mark.parametrize("k", [1, 0, 11])
def test_an_impossible_number_of_folds_says_what_is_possible(k) -> None:
    with pytest.raises(ValueError, match=r"cannot cut 10 reference rows in .* folds: expected 2 to 10"):
        _reference(10, True).folds(k)
