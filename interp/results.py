"""One way to save and load a result: a directory of named parts and a versioned ``settings.json``.

A result class subclasses ``SavedResult``, names itself (``RESULT``, with a format number
``FORMAT`` bumped whenever its tables change), and says how it becomes parts and back:
``_tables()``, ``_settings()`` (by default its ``settings`` field) and ``_from_saved(tables,
settings)``. A part is a table, written as ``<name>.parquet``, or another saved result, written
into the subdirectory ``<name>/`` and read back as its own kind. ``save`` writes every part and
``settings.json`` holding ``result``, ``format``, the part names (``tables``, and ``nested`` with
each nested result's kind) and the settings; ``load`` checks all of that first and names what is
wrong (no saved result here, another kind of result, an older format, a missing part).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar, TypeVar, Union

import pandas as pd

R = TypeVar("R", bound="SavedResult")
Part = Union[pd.DataFrame, "SavedResult"]
HEAD = ("result", "format", "tables", "nested")


class ResultFormatError(ValueError):
    """A directory that does not hold the saved result it is read as."""


class SavedResult:
    RESULT: ClassVar[str]
    FORMAT: ClassVar[int] = 1
    _KINDS: ClassVar[dict[str, type[SavedResult]]] = {}  # every result class by its RESULT, for nested parts

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "RESULT" in vars(cls):
            SavedResult._KINDS[cls.RESULT] = cls

    def _tables(self) -> dict[str, Part]:
        raise NotImplementedError

    def _settings(self) -> dict:
        """What ``settings.json`` keeps beside the parts: by default the result's ``settings`` field, if any."""
        return getattr(self, "settings", {})

    @classmethod
    def _from_saved(cls: type[R], tables: dict[str, Part], settings: dict) -> R:
        raise NotImplementedError

    def save(self, directory: str | Path) -> Path:
        """Write every table as ``<name>.parquet``, every nested result into ``<name>/``, and
        ``settings.json`` into ``directory``."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        parts, settings = self._tables(), self._settings()
        if clash := sorted(set(settings) & set(HEAD)):
            raise ValueError(f"{self.RESULT} settings may not use the names {clash}: settings.json keeps them")
        nested = {name: part for name, part in parts.items() if isinstance(part, SavedResult)}
        for name, part in parts.items():
            if name in nested:
                part.save(out / name)
            else:
                part.to_parquet(out / f"{name}.parquet", index=False)
        head = {"result": self.RESULT, "format": self.FORMAT, "tables": sorted(set(parts) - set(nested)),
                "nested": {name: part.RESULT for name, part in sorted(nested.items())}}
        (out / "settings.json").write_text(json.dumps({**head, **settings}, indent=2, default=str))
        return out

    @classmethod
    def read_settings(cls, directory: str | Path) -> dict:
        """The saved settings, after checking the directory holds this kind of result in this format."""
        src = Path(directory)
        file = src / "settings.json"
        if not file.exists():
            raise FileNotFoundError(f"{src} holds no saved {cls.RESULT} (no settings.json; a result saved by an "
                                    f"older version has none: recompute it)")
        try:
            settings = json.loads(file.read_text())
        except json.JSONDecodeError as err:
            raise ResultFormatError(f"{file} is not valid JSON ({err}); save the result again") from err
        if settings.get("result") != cls.RESULT:
            kind = settings.get("result") or "unknown (an older version's result?)"
            raise ResultFormatError(f"{file} holds a saved result of kind {kind}; {cls.RESULT}.load reads only "
                                    f"its own kind")
        if settings.get("format") != cls.FORMAT:
            raise ResultFormatError(f"{file}: {cls.RESULT} format {settings.get('format')}, this version reads "
                                    f"format {cls.FORMAT}; recompute the result")
        return settings

    @classmethod
    def load(cls: type[R], directory: str | Path) -> R:
        src = Path(directory)
        settings = cls.read_settings(src)
        nested = settings.get("nested", {})
        missing = [f"{n}.parquet" for n in settings["tables"] if not (src / f"{n}.parquet").exists()]
        missing += [f"{n}/" for n in nested if not (src / n).is_dir()]
        if missing:
            raise FileNotFoundError(f"{src} lacks {', '.join(missing)} of its {cls.RESULT}")
        parts: dict[str, Part] = {n: pd.read_parquet(src / f"{n}.parquet") for n in settings["tables"]}
        parts |= {n: cls._kind(kind).load(src / n) for n, kind in nested.items()}
        return cls._from_saved(parts, {k: v for k, v in settings.items() if k not in HEAD})

    @classmethod
    def _kind(cls, name: str) -> type[SavedResult]:
        if name not in SavedResult._KINDS:
            raise ResultFormatError(f"a saved {cls.RESULT} nests a {name}, a kind of result this version does "
                                    f"not know; recompute the result")
        return SavedResult._KINDS[name]


__all__ = ["ResultFormatError", "SavedResult"]
