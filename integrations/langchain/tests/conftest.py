"""Fixtures: a tiny random scorer checkpoint (built locally, never downloaded)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_scorer(tmp_path_factory: pytest.TempPathFactory):
    from capplug import Scorer
    from capplug.testing import save_tiny_scorer

    return Scorer.from_pretrained(save_tiny_scorer(tmp_path_factory.mktemp("tiny-scorer")))
