import warnings

import pandas as pd
import pytest

from circuits.measure.coverage import coverage_lines, coverage_table, warn_low_coverage

VALUES = pd.DataFrame({
    "context": ["loan", "loan", "office", "office", "vote"],
    "answer_type": ["dollars", "dollars", "percent", "percent", "yes_no"],
    "grid_mass": [0.9, 0.96, 0.02, 0.04, 0.99],
    "other_mass": [0.08, 0.02, 0.9, 0.9, 0.01],
    "tail_mass": [0.02, 0.02, 0.08, 0.06, 0.0],
})


def test_coverage_table_and_statements():
    table = coverage_table(VALUES).set_index("context")
    assert table.loc["loan", ["covered", "covered_min", "other", "beyond"]].tolist() == pytest.approx(
        [0.93, 0.9, 0.05, 0.02])
    assert table.loc["office", "n_prompts"] == 2
    lines = coverage_lines(VALUES)
    assert lines[0] == ("loan: the metric sees 93% of the model's answers (lowest prompt 90%); unseen: 5% not "
                        "a number (a word, a refusal), 2% numbers beyond the scored ones")
    assert lines[2].startswith("vote: the metric sees 99%") and "neither yes nor no" in lines[2]
    bounded = VALUES.assign(bounded_mass=[0.5, 0.3, 0.0, 0.0, 0.0])
    assert coverage_table(bounded).set_index("context").loc["loan", "bounded"] == pytest.approx(0.4)
    assert coverage_lines(bounded)[0].startswith("loan: the metric sees 93% of the model's answers (lowest prompt "
                                                 "90%; 40% as numbers known by their leading digits); unseen:")
    assert coverage_lines(bounded)[1] == lines[1]  # none bounded: nothing said
    ranked = bounded.assign(beyond_scale_mass=[0.0, 0.0, 0.01, 0.03, 0.0])
    assert coverage_table(ranked).set_index("context").loc["office", "beyond_scale"] == pytest.approx(0.02)
    assert coverage_lines(ranked)[1].startswith("office: the metric sees 3% of the model's answers (lowest prompt "
                                                "2%; 2% outside the scale, counted at its end); unseen:")
    assert coverage_lines(ranked)[0] == coverage_lines(bounded)[0]
    old = coverage_lines(VALUES.drop(columns=["other_mass", "tail_mass"]))  # a measurement without them
    assert old[1] == "office: the metric sees 3% of the model's answers (lowest prompt 2%)"


def test_low_coverage_warns_naming_the_scenario():
    with pytest.warns(UserWarning, match=r"scenario 'office': the metric covers only 3%") as caught:
        assert warn_low_coverage(VALUES) == ["office"]
    assert len(caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_low_coverage(VALUES[VALUES["context"] != "office"]) == []
