"""The bundled scorer in bfloat16 ranks like float32 on a fixed set of candidate groups."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

from capplug import Scorer

pytestmark = pytest.mark.integration

GROUPS = json.loads((Path(__file__).parents[1] / "support" / "ranking_groups.json").read_text())[
    "groups"
]
# Candidates whose float32 scores are closer than this are a tie either way round.
TIE = 1e-3


def test_bfloat16_picks_what_float32_picks() -> None:
    exact = Scorer(dtype="float32")
    fast = Scorer(dtype="bfloat16")
    pairs = [(g["instruction"], r) for g in GROUPS for r in g["responses"]]
    a, b = np.array(exact.score_pairs(pairs)), np.array(fast.score_pairs(pairs))
    assert spearmanr(a, b)[0] >= 0.99
    start, differing = 0, []
    for group in GROUPS:
        end = start + len(group["responses"])
        x, y = a[start:end], b[start:end]
        if int(np.argmax(x)) != int(np.argmax(y)) and x.max() - x[int(np.argmax(y))] > TIE:
            differing.append(group["instruction"])
        start = end
    assert differing == []
