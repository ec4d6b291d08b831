"""Examples that run offline on the bundled models: they run, and say what they promise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_feedback_adaptation_adapts_and_reports_the_guard() -> None:
    result = subprocess.run(
        [sys.executable, "feedback_adaptation.py"],
        cwd=EXAMPLES,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "judged pairs, adapted in" in result.stdout
    assert "guard: the adapted scorer picks" in result.stdout
    assert "8 conversions neither saw, house-style answer picked: bundled" in result.stdout
