"""The one percentile every report uses, so the monitor's p95 and the load test's p95 are one number."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile_linear(values: Sequence[float], p: float) -> float | None:
    """The p-th percentile (0-100) by linear interpolation between closest ranks (numpy's default,
    Hyndman and Fan's type 7); None for no values. `values` need not be sorted."""
    if not values:
        return None
    if not 0 <= p <= 100:
        raise ValueError(f"percentile must be between 0 and 100, got {p}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
