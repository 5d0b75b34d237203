"""The stage store: orphan temporary directories, resumable stages, the user's umask, config views."""
import os

import pytest

from circuits.study.config import StudyConfig
from circuits.study.stages import ConfigView, StageStore


def _write(name):
    def compute(d):
        (d / "out.txt").write_text(name)

    return compute


def test_orphans_are_removed_and_folders_get_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        store = StageStore(tmp_path)
        (store.root / ".scores-x-abc123").mkdir()  # a killed run's temporary directory
        (store.root / ".audit-partial-oldkey").mkdir()
        store = StageStore(tmp_path)
        assert not (store.root / ".scores-x-abc123").exists()
        store.run("audit", "newkey", _write("a"), resumable=True)
        assert sorted(p.name for p in store.root.iterdir()) == ["audit"]
        assert (store.root / "audit").stat().st_mode & 0o777 == 0o750
        assert (store.root / "audit" / "out.txt").read_text() == "a"
    finally:
        os.umask(old)


def test_a_resumable_stage_finds_its_partial_work(tmp_path):
    store = StageStore(tmp_path)
    seen = []

    def interrupted(d):
        (d / "chunk-0").write_text("done")
        raise KeyboardInterrupt

    def resumes(d):
        seen.extend(sorted(p.name for p in d.iterdir()))

    with pytest.raises(KeyboardInterrupt):
        store.run("audit", "k1", interrupted, resumable=True)
    assert (store.root / ".audit-partial-k1" / "chunk-0").exists()
    StageStore(tmp_path).run("audit", "k1", resumes, resumable=True)
    assert seen == ["chunk-0"]
    with pytest.raises(KeyboardInterrupt):
        store.run("scores", "k1", interrupted)  # not resumable: nothing kept
    assert not [p for p in store.root.iterdir() if p.name.startswith(".scores")]


def test_a_config_view_refuses_undeclared_fields():
    view = ConfigView(StudyConfig(), "overlap", ("overlap_k",))
    assert view.overlap_k == 100
    with pytest.raises(AttributeError, match="stage 'overlap' reads config field 'seed', which it does not declare"):
        _ = view.seed
