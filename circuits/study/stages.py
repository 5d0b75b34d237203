"""Resumable, atomically written stages of a study.

Each stage writes into ``<out>/stages/<name>/`` through a temporary sibling directory renamed
into place, with a ``stage.json`` holding a key: the hash of the settings the stage depends on
and of the keys of the stages it reads. A re-run loads every stage whose key still matches and
recomputes the rest, so an interrupted run loses nothing finished and a changed setting
invalidates exactly the stages downstream of it. A resumable stage keeps its temporary directory
(named by its key) across an interruption, so it can pick up its own partial work; every other
temporary directory a killed run left is removed by the next one. Directories get the user's umask.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from interp.locking import user_mode


def settings_key(*parts: Any) -> str:
    """A stable hash of JSON-serializable settings."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def frame_digest(frame: pd.DataFrame) -> str:
    """A hash of a table's contents (columns, values and row order)."""
    rows = pd.util.hash_pandas_object(frame, index=False).to_numpy()
    return settings_key(list(frame.columns), hashlib.sha256(rows.tobytes()).hexdigest())


@dataclass(frozen=True)
class StageRecord:
    name: str
    key: str
    path: Path
    computed: bool  # False when loaded from an earlier run
    seconds: float


class ConfigView:
    """The fields of a config that one stage declared; reading any other field is an error, so a
    stage cannot depend on a setting its key does not hash."""

    def __init__(self, config, stage: str, fields):
        self._config, self._stage, self._fields = config, stage, frozenset(fields)

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        if name not in self._fields:
            raise AttributeError(f"stage {self._stage!r} reads config field {name!r}, which it does not declare; "
                                 "add it to the stage's fields so its key covers it")
        return getattr(self._config, name)


class StageStore:
    """The stages of one output directory (hold its lock while using it: see ``interp.locking``)."""

    PARTIAL = "-partial-"

    def __init__(self, out_dir: str | os.PathLike):
        self.root = Path(out_dir) / "stages"
        self.root.mkdir(parents=True, exist_ok=True)
        self.records: dict[str, StageRecord] = {}
        for orphan in self.root.glob(".*"):  # left by a killed run; resumable ones are judged by run()
            if self.PARTIAL not in orphan.name:
                shutil.rmtree(orphan, ignore_errors=True)

    def _scratch(self, name: str, key: str, resumable: bool) -> Path:
        for old in self.root.glob(f".{name}{self.PARTIAL}*"):
            if not resumable or old.name != f".{name}{self.PARTIAL}{key}":
                shutil.rmtree(old, ignore_errors=True)
        if resumable:
            tmp = self.root / f".{name}{self.PARTIAL}{key}"
            tmp.mkdir(mode=user_mode(), exist_ok=True)
        else:
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=self.root))
            tmp.chmod(user_mode())
        return tmp

    def _meta(self, name: str) -> dict | None:
        meta = self.root / name / "stage.json"
        return json.loads(meta.read_text()) if meta.exists() else None

    def done(self, name: str, key: str) -> bool:
        meta = self._meta(name)
        return meta is not None and meta.get("key") == key

    def run(self, name: str, key: str, compute: Callable[[Path], None], *, resumable: bool = False,
            rerun: bool = False) -> StageRecord:
        """Run ``compute(tmp_dir)`` unless a finished stage with this key exists (``rerun``: even
        then, replacing it); return its record.

        With ``resumable`` an interrupted ``compute`` finds its partial output in ``tmp_dir`` on the
        next run with the same key."""
        target = self.root / name
        started = time.time()
        if self.done(name, key) and not rerun:
            for old in self.root.glob(f".{name}{self.PARTIAL}*"):
                shutil.rmtree(old, ignore_errors=True)
            record = StageRecord(name, key, target, False, 0.0)
        else:
            tmp = self._scratch(name, key, resumable)
            finished = False
            try:
                compute(tmp)
                meta = {"key": key, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": time.time() - started}
                (tmp / "stage.json").write_text(json.dumps(meta, indent=2))
                if target.exists():
                    stale = target.with_name(f".{name}-stale-{os.getpid()}")
                    os.replace(target, stale)
                    shutil.rmtree(stale, ignore_errors=True)
                os.replace(tmp, target)
                finished = True
            finally:
                if finished or not resumable:
                    shutil.rmtree(tmp, ignore_errors=True)
            record = StageRecord(name, key, target, True, time.time() - started)
        self.records[name] = record
        return record
