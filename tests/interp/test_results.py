"""The one save/load of results: round trip, and a clear error for every wrong directory."""
import json
import shutil
from dataclasses import dataclass

import pandas as pd
import pytest
import torch

from interp.attribution import AblationAttribution, AttributionResult
from interp.components import ComponentSet, Head, Neuron
from interp.patching import PatchingResult
from interp.results import ResultFormatError, SavedResult


def attribution(per_prompt: bool) -> AttributionResult:
    g = torch.Generator().manual_seed(0)
    scores = {"neuron": torch.randn(2, 3, generator=g), "head": torch.randn(2, 2, generator=g)}
    kept = {k: torch.randn(4, *v.shape, generator=g) for k, v in scores.items()} if per_prompt else None
    return AttributionResult(scores, kept, 4, torch.arange(4.0), -torch.arange(4.0), "atp")


@pytest.mark.parametrize("per_prompt", [False, True])
def test_attribution_round_trip(tmp_path, per_prompt):
    result = attribution(per_prompt)
    loaded = AttributionResult.load(result.save(tmp_path / "a"))
    for kind in result.scores:
        torch.testing.assert_close(loaded.scores[kind], result.scores[kind])
        if per_prompt:
            torch.testing.assert_close(loaded.per_prompt[kind], result.per_prompt[kind])
    assert (loaded.per_prompt is None) == (not per_prompt) and loaded.method == "atp" and loaded.n_prompts == 4


def test_ablation_attribution_and_patching_round_trip(tmp_path):
    scores = {"neuron": torch.randn(2, 3)}
    ablation = AblationAttribution(scores, {"neuron": torch.randn(5, 2, 3)}, torch.full((5,), 0.2), torch.arange(5.0),
                                   "mean")
    loaded = AblationAttribution.load(ablation.save(tmp_path / "b"))
    torch.testing.assert_close(loaded.per_prompt["neuron"], ablation.per_prompt["neuron"])
    assert loaded.how == "mean"
    patching = PatchingResult(torch.randn(2, 3), torch.zeros(3), torch.ones(3),
                              [ComponentSet([Head(0, 1)]), ComponentSet([Head(1, 0), Neuron(1, 2)])])
    back = PatchingResult.load(patching.save(tmp_path / "p"))
    torch.testing.assert_close(back.values, patching.values)
    assert back.variants == patching.variants


def test_wrong_directories_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="no saved AttributionResult"):
        AttributionResult.load(tmp_path)
    out = attribution(False).save(tmp_path / "a")
    with pytest.raises(ResultFormatError, match="of kind AttributionResult; PatchingResult.load reads only"):
        PatchingResult.load(out)
    settings = json.loads((out / "settings.json").read_text())
    (out / "settings.json").write_text(json.dumps({**settings, "format": 0}))
    with pytest.raises(ResultFormatError, match="format 0.*recompute"):
        AttributionResult.load(out)
    (out / "settings.json").write_text(json.dumps(settings))
    (out / "metrics.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="lacks metrics.parquet"):
        AttributionResult.load(out)
    (out / "settings.json").write_text("{not json")
    with pytest.raises(ResultFormatError, match="not valid JSON"):
        AttributionResult.load(out)
    assert isinstance(pd.read_parquet(out / "scores.parquet"), pd.DataFrame)


@dataclass(frozen=True)
class Wrapped(SavedResult):
    """A result that nests another, as ``circuits.select.scoring.ContextScores`` nests its attribution."""

    RESULT = "tests.Wrapped"

    inner: AttributionResult
    label: str

    def _tables(self):
        return {"inner": self.inner}

    def _settings(self):
        return {"label": self.label}

    @classmethod
    def _from_saved(cls, tables, settings):
        return cls(tables["inner"], settings["label"])


def test_a_nested_result_is_saved_in_its_subdirectory_and_read_as_its_kind(tmp_path):
    out = Wrapped(attribution(False), "x").save(tmp_path / "w")
    loaded = Wrapped.load(out)
    assert isinstance(loaded.inner, AttributionResult) and loaded.label == "x"
    pd.testing.assert_frame_equal(loaded.inner.to_dataframe(), attribution(False).to_dataframe())
    assert AttributionResult.load(out / "inner").method == "atp"
    shutil.rmtree(out / "inner")
    with pytest.raises(FileNotFoundError, match="lacks inner/"):
        Wrapped.load(out)
    clashing = Wrapped(attribution(False), "x")
    object.__setattr__(clashing, "_settings", lambda: {"format": 2})
    with pytest.raises(ValueError, match="may not use the names"):
        clashing.save(tmp_path / "c")
