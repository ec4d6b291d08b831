"""The head-of-line benchmark probes every phase of the big request, its last half second too."""

from __future__ import annotations

import numpy as np
import pytest
from benchmarks.proxy_head_of_line import delays_for, percentile


def test_the_probes_cover_the_big_requests_whole_time_and_its_last_half_second() -> None:
    delays = delays_for(1.6, 8)
    assert delays[0] == 0.0 and delays == sorted(delays)
    assert {1.2, 1.4, 1.5} <= set(delays)  # T - 0.4, T - 0.2, T - 0.1
    gaps = np.diff([*delays, 1.6])
    assert gaps.max() <= 0.2 + 1e-9  # no phase of it goes unprobed
    # A big request shorter than half a second still gets its tail probed where it exists.
    assert delays_for(0.3, 4) == [0.0, 0.075, 0.1, 0.15, 0.2, 0.225]


@pytest.mark.parametrize("q", [0, 50, 90, 99, 100])
def test_percentiles_are_numpys(q: int) -> None:
    values = [0.3, 0.01, 0.2, 0.05, 0.12, 0.4, 0.07]
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
