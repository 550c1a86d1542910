"""The binomial upper tail shared by the extraction, poisoning and model-version detectors."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from detectors._binomial import binom_tail


def _exact(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(max(k, 0), n + 1))


@given(st.integers(-3, 60), st.integers(1, 60), st.floats(0.001, 0.999))
def test_binom_tail_is_the_probability_of_at_least_k_hits(k: int, n: int, p: float) -> None:
    assert math.isclose(binom_tail(k, n, p), min(_exact(k, n, p), 1.0), rel_tol=1e-9, abs_tol=1e-12)


def test_binom_tail_ends() -> None:
    assert binom_tail(0, 10, 0.3) == 1.0  # at least none: certain
    assert binom_tail(11, 10, 0.3) == 0.0  # more hits than trials: impossible
    assert math.isclose(binom_tail(10, 10, 0.5), 0.5**10)
