"""One way to save and load a result: a directory of named Parquet tables and a versioned ``settings.json``.

A result class subclasses ``SavedResult``, names itself (``RESULT``, with a format number
``FORMAT`` bumped whenever its tables change), and says how it becomes tables and back:
``_tables()`` / ``_settings()`` and ``_from_saved(tables, settings)``. ``save`` writes
``<table>.parquet`` for every table and ``settings.json`` holding ``result``, ``format``, the
table names and the settings; ``load`` checks all of that first and names what is wrong (no
saved result here, another kind of result, an older format, a missing table).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar, TypeVar

import pandas as pd

R = TypeVar("R", bound="SavedResult")


class ResultFormatError(ValueError):
    """A directory that does not hold the saved result it is read as."""


class SavedResult:
    RESULT: ClassVar[str]
    FORMAT: ClassVar[int] = 1

    def _tables(self) -> dict[str, pd.DataFrame]:
        raise NotImplementedError

    def _settings(self) -> dict:
        return {}

    @classmethod
    def _from_saved(cls: type[R], tables: dict[str, pd.DataFrame], settings: dict) -> R:
        raise NotImplementedError

    def save(self, directory: str | Path) -> Path:
        """Write every table as ``<name>.parquet`` and ``settings.json`` into ``directory``."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tables = self._tables()
        for name, table in tables.items():
            table.to_parquet(out / f"{name}.parquet", index=False)
        head = {"result": self.RESULT, "format": self.FORMAT, "tables": sorted(tables)}
        (out / "settings.json").write_text(json.dumps({**head, **self._settings()}, indent=2, default=str))
        return out

    @classmethod
    def read_settings(cls, directory: str | Path) -> dict:
        """The saved settings, after checking the directory holds this kind of result in this format."""
        src = Path(directory)
        file = src / "settings.json"
        if not file.exists():
            raise FileNotFoundError(f"{src} holds no saved {cls.RESULT} (no settings.json)")
        try:
            settings = json.loads(file.read_text())
        except json.JSONDecodeError as err:
            raise ResultFormatError(f"{file} is not valid JSON ({err}); save the result again") from err
        if settings.get("result") != cls.RESULT:
            raise ResultFormatError(f"{file} holds a saved {settings.get('result') or 'result of unknown kind'}, "
                                    f"not a {cls.RESULT}")
        if settings.get("format") != cls.FORMAT:
            raise ResultFormatError(f"{file}: {cls.RESULT} format {settings.get('format')}, this version reads "
                                    f"format {cls.FORMAT}; recompute the result")
        return settings

    @classmethod
    def load(cls: type[R], directory: str | Path) -> R:
        src = Path(directory)
        settings = cls.read_settings(src)
        missing = [n for n in settings["tables"] if not (src / f"{n}.parquet").exists()]
        if missing:
            raise FileNotFoundError(f"{src} lacks {', '.join(f'{n}.parquet' for n in missing)} of its {cls.RESULT}")
        tables = {n: pd.read_parquet(src / f"{n}.parquet") for n in settings["tables"]}
        return cls._from_saved(tables, {k: v for k, v in settings.items() if k not in ("result", "format", "tables")})


__all__ = ["ResultFormatError", "SavedResult"]
