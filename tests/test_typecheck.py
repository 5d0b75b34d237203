"""The test run checks annotations: a wrongly shaped tensor raises (tests/conftest.py installs the hook)."""
import os

import jaxtyping
import pytest
import torch

from interp.batching import TokenBatch
from interp.metrics import kl_divergence

pytestmark = pytest.mark.skipif(os.environ.get("BIAS_CIRCUITS_TYPECHECK", "1") == "0", reason="checks switched off")


def test_a_function_called_with_a_wrongly_shaped_tensor_raises():
    logits = torch.zeros(2, 3, 5)
    batch = TokenBatch(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long), torch.zeros(2).long())
    assert kl_divergence(logits, logits, batch).shape == (2,)
    with pytest.raises(jaxtyping.TypeCheckError):
        kl_divergence(logits, torch.zeros(2, 3, 7), batch)  # a different vocabulary


def test_a_dataclass_built_with_a_wrongly_shaped_field_raises():
    with pytest.raises(jaxtyping.TypeCheckError):
        TokenBatch(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 4, dtype=torch.long), torch.zeros(2).long())
