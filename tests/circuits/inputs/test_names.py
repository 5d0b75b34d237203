import pytest

from circuits.inputs.names import GENDERS, GROUPS, SOURCES, all_names, names_frame, sample_names, split_names

AUDIT = {
    ("White", "man"): "Hunter Jake Seth Zachary Todd Matthew Logan Ryan Scott Dustin",
    ("White", "woman"): "Katelyn Claire Laurie Stephanie Abigail Megan Kristen Emily Sarah Molly",
    ("Black", "man"): "DaShawn Jamal DaQuan DeAndre Tyrone Tremayne Keyshawn Terrell Latrell Jayvon",
    ("Black", "woman"): "Tanisha Lakisha Janae Tamika Latoya Keyana Tionna Latonya Shanice Tyra",
}


def test_audit_names_are_all_there_with_their_surnames():
    audit = [n for n in all_names() if n.in_audit]
    assert len(audit) == 40
    for (group, gender), firsts in AUDIT.items():
        cell = {n.first for n in audit if n.group == group and n.gender == gender}
        assert cell == set(firsts.split())
    assert {n.surname for n in audit if n.group == "White"} == {"Becker"}
    assert {n.surname for n in audit if n.group == "Black"} == {"Washington"}


def test_at_least_32_names_per_group_each_with_known_sources():
    names = all_names()
    for group in GROUPS:
        assert len([n for n in names if n.group == group]) >= 32
        for gender in GENDERS:
            assert len([n for n in names if n.group == group and n.gender == gender]) >= 15
    assert all(n.sources and set(n.sources) <= set(SOURCES) for n in names)
    assert len({n.full for n in names}) == len(names)


def test_name_split_is_seeded_and_stratified():
    names = all_names()
    split = split_names(names, heldout_fraction=0.25, seed=3)
    assert split == split_names(names, heldout_fraction=0.25, seed=3)
    assert split != split_names(names, heldout_fraction=0.25, seed=4)
    frame = names_frame(names).assign(split=lambda f: f["name"].map(split))
    per_cell = frame.groupby(["group", "gender"])["split"].value_counts().unstack()
    assert (per_cell["heldout"] >= 1).all() and (per_cell["train"] > per_cell["heldout"]).all()
    assert per_cell["heldout"].sum() == pytest.approx(0.25 * len(names), abs=2)


def test_sample_names_takes_per_cell_from_names_or_frames():
    names = all_names()
    picked = sample_names(names, 2, seed=1)
    frame = names_frame(names)
    assert picked == sample_names(frame, 2, seed=1)
    cells = frame[frame["name"].isin(picked)].groupby(["group", "gender"]).size()
    assert list(cells) == [2, 2, 2, 2]
