"""The cross-context tables of a study: saved and read back as one result."""
import pandas as pd
import pytest

from circuits.evaluate.analysis import Overlap, load_overlap_tables
from interp.results import ResultFormatError


def test_overlap_tables_round_trip_and_refuse_other_results(tmp_path):
    pairwise = pd.DataFrame({"context_a": ["a"], "context_b": ["b"], "stat": ["jaccard"], "value": [0.25]})
    overlap = Overlap({"pairwise": pairwise, "permutation": pd.DataFrame()})
    out = overlap.save(tmp_path / "overlap")
    pd.testing.assert_frame_equal(Overlap.load(out).to_dataframe(), overlap.to_dataframe())
    pd.testing.assert_frame_equal(load_overlap_tables(out)["pairwise"], pairwise)
    (out / "settings.json").write_text('{"result": "Generalization", "format": 1, "tables": []}')
    with pytest.raises(ResultFormatError, match="of kind Generalization; Overlap.load reads only"):
        Overlap.load(out)
