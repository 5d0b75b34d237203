"""Fixtures: a tiny random model (fast tier) and the embedded SmolLM2 (``slow`` tier)."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_model():
    from interp.testing import load_tiny_model

    torch.manual_seed(0)
    return load_tiny_model()


@pytest.fixture(scope="session")
def smollm2():
    from interp import load_model

    return load_model("smollm2-135m-instruct", device="cpu")
