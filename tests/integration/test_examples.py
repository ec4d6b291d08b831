"""Examples that run offline on the bundled models: they run, and say what they promise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_feedback_adaptation_stores_a_guarded_task_scorer_the_reranker_then_uses() -> None:
    result = subprocess.run(
        [sys.executable, "feedback_adaptation.py"],
        cwd=EXAMPLES,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "judged selections, task scorer adapted and stored in" in out
    assert "guard: the adapted scorer picks" in out
    before = int(out.split("picked by the bundled scorer: ")[1].split("/8")[0])
    after = int(out.split("house-style answer picked now: ")[1].split("/8")[0])
    if "use it" in out:  # the guard let it score: the reranker, not restarted, now uses it
        assert "scored by task scorer" in out and after > before
    else:
        assert "scored by the bundled scorer" in out and after == before
