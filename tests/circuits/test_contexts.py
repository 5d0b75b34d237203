import pytest

from circuits.contexts import (
    ANSWER_TYPES,
    CONTEXTS,
    DECIMALS,
    DEFAULT_ANSWERS,
    DETAILS,
    AnswerGrid,
    UnknownContextError,
    get_context,
)


def test_registry_covers_every_required_scenario_with_enough_variations():
    scenarios = {c.scenario for c in CONTEXTS.values()}
    assert {"lending", "commerce", "hiring", "housing", "public_office", "sports", "chess"} <= scenarios
    lending_types = {c.answer.type for c in CONTEXTS.values() if c.scenario == "lending"}
    assert "dollars" in lending_types and "yes_no" in lending_types
    assert {c.answer.type for c in CONTEXTS.values()} == set(ANSWER_TYPES)
    for ctx in CONTEXTS.values():
        assert len(ctx.variations) >= 6
        assert ctx.answer.grid is None  # the model's own answers are scored


@pytest.mark.parametrize(
    "name,sign",
    [
        ("lending_amount", 1),
        ("lending_rate", -1),
        ("commerce_buy", 1),
        ("commerce_sell", -1),
        ("hiring_salary", 1),
        ("housing_rent", -1),
        ("housing_tenant", 1),
        ("sports", -1),
        ("chess", 1),
    ],
)
def test_sign_conventions(name, sign):
    assert CONTEXTS[name].sign == sign


def test_detail_levels_add_nothing_qualitative_or_numeric_details():
    ctx = CONTEXTS["commerce_buy"]
    var = ctx.variations[0]
    low, high, numeric = (ctx.render(var, d, "Jill Becker") for d in DETAILS)
    assert "Jill Becker" in low and var.item in low
    assert var.high not in low and var.anchor not in low
    assert var.high in high and var.anchor in numeric
    assert low.endswith(ctx.answer.instruction)
    with pytest.raises(ValueError, match="detail level"):
        ctx.render(var, "medium", "Jill Becker")


def test_grids_reject_overlapping_candidates_unless_terminated():
    with pytest.raises(ValueError, match="prefix"):
        AnswerGrid(("10", "100"), (10.0, 100.0))
    with pytest.raises(ValueError, match="at least 2"):
        AnswerGrid(("10",), (10.0,))
    assert AnswerGrid(("10", "100"), (10.0, 100.0), terminated=True).terminated


def test_numeric_prefixes_end_right_before_the_number():
    from circuits.bias import number_start

    for ctx in CONTEXTS.values():
        if ctx.answer.type != "yes_no":
            assert ctx.answer.prefix[-1] in "$#: ." and ctx.answer.type in DECIMALS
    assert number_start(CONTEXTS["chess"].answer.prefix) == "0."
    assert number_start("Recommended loan amount: $") == ""


def test_get_context_names_the_known_contexts():
    assert get_context("chess") is CONTEXTS["chess"]
    with pytest.raises(UnknownContextError) as err:
        get_context("poker")
    assert "poker" in str(err.value) and "lending_amount" in str(err.value)


def test_default_answers_cover_every_answer_type():
    assert set(DEFAULT_ANSWERS) == set(ANSWER_TYPES)
