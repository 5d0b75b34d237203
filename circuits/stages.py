"""Resumable, atomically written stages of a study.

Each stage writes into ``<out>/stages/<name>/`` through a temporary sibling directory renamed
into place, with a ``stage.json`` holding a key: the hash of the settings the stage depends on
and of the keys of the stages it reads. A re-run loads every stage whose key still matches and
recomputes the rest, so an interrupted run loses nothing finished and a changed setting
invalidates exactly the stages downstream of it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


def settings_key(*parts: Any) -> str:
    """A stable hash of JSON-serializable settings."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class StageRecord:
    name: str
    key: str
    path: Path
    computed: bool  # False when loaded from an earlier run
    seconds: float


class StageStore:
    """The stages of one output directory."""

    def __init__(self, out_dir: str | os.PathLike):
        self.root = Path(out_dir) / "stages"
        self.root.mkdir(parents=True, exist_ok=True)
        self.records: dict[str, StageRecord] = {}

    def _meta(self, name: str) -> dict | None:
        meta = self.root / name / "stage.json"
        return json.loads(meta.read_text()) if meta.exists() else None

    def done(self, name: str, key: str) -> bool:
        meta = self._meta(name)
        return meta is not None and meta.get("key") == key

    def run(self, name: str, key: str, compute: Callable[[Path], None]) -> StageRecord:
        """Run ``compute(tmp_dir)`` unless a finished stage with this key exists; return its record."""
        target = self.root / name
        started = time.time()
        if self.done(name, key):
            record = StageRecord(name, key, target, False, 0.0)
        else:
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=self.root))
            try:
                compute(tmp)
                meta = {"key": key, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": time.time() - started}
                (tmp / "stage.json").write_text(json.dumps(meta, indent=2))
                if target.exists():
                    stale = target.with_name(f".{name}-stale-{os.getpid()}")
                    os.replace(target, stale)
                    shutil.rmtree(stale, ignore_errors=True)
                os.replace(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            record = StageRecord(name, key, target, True, time.time() - started)
        self.records[name] = record
        return record
