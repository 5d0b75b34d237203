"""Fixtures: a tiny random model (fast tier) and the embedded SmolLM2 (``slow`` tier)."""
from __future__ import annotations

import os

import pytest
import torch
from jaxtyping import config, install_import_hook

# Every function and dataclass of the two packages checks its annotations (jaxtyping shapes through
# beartype) when the tests import them; ``int`` passes where ``float`` is annotated (PEP 484).
# BIAS_CIRCUITS_TYPECHECK=0 runs them unchecked (for timing).
if os.environ.get("BIAS_CIRCUITS_TYPECHECK", "1") != "0":
    install_import_hook(["interp", "circuits"], "beartype.beartype(conf=beartype.BeartypeConf(is_pep484_tower=True))")


@pytest.fixture
def unchecked():
    """No annotation checks for one test: it asserts the code's own errors for values its annotations
    exclude (what a caller sees at run time, where nothing is checked)."""
    config.update("jaxtyping_disable", True)
    yield
    config.update("jaxtyping_disable", False)


@pytest.fixture(scope="session")
def tiny_model():
    from interp.testing import load_tiny_model

    torch.manual_seed(0)
    return load_tiny_model()


@pytest.fixture(scope="session")
def smollm2():
    from interp import load_model

    return load_model("smollm2-135m-instruct", device="cpu")
