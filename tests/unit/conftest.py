"""Unit tests score in float32 unless they test the precision choice itself: a per-machine
calibration would make their scores depend on which machine runs them and how busy it is."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from capplug.scoring.precision import ENV_VAR


@pytest.fixture(autouse=True, scope="session")
def float32_scoring() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ENV_VAR, "float32")
        yield
