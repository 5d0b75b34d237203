"""Imported prompt tables: reading and validating a CSV or JSONL table, and loading it as a ``PromptSet``.

A table has one row per prompt: ``scenario, variation, name_group, name, context_level,
prompt_text``, optionally ``answer_type`` and ``higher_favours``. ``read_prompt_table`` reports
every problem together, each naming its line; ``load_prompt_table`` makes each scenario a context.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import pandas as pd

from circuits.inputs.contexts import ANSWER_TYPES, DETAILS, AnswerFormat
from circuits.inputs.names import GROUPS, lookup, split_names
from circuits.inputs.prompts import PromptSet, format_prompt, split_variations, uses_chat

TABLE_COLUMNS = ("scenario", "variation", "name_group", "name", "context_level", "prompt_text")
# Answer formats of imported tables: a prefix generic to the answer type, so the next tokens are the
# answer itself in the model's own format (the metric reads the numbers the model writes there).
IMPORT_ANSWERS: dict[str, AnswerFormat] = {
    "dollars": AnswerFormat("dollars", "Reply with a dollar amount only.", "Answer: $"),
    "percent": AnswerFormat("percent", "Reply with a percentage only.", "Answer: "),
    "probability": AnswerFormat("probability", "Reply with a number between 0 and 1.", "Answer: "),
    "score": AnswerFormat("score", "Reply with a number only.", "Answer: "),
    "rank": AnswerFormat("rank", "Reply with a rank only.", "Answer: "),
    "yes_no": AnswerFormat("yes_no", "Answer Yes or No.", "Answer:"),
}
# Whether a higher answer favours the named person when the table does not say: a rank is better low.
HIGHER_FAVOURS = {kind: kind != "rank" for kind in ANSWER_TYPES}
_YES_NO_WORDS = {"yes": True, "true": True, "1": True, "no": False, "false": False, "0": False}
_GENDER_WORDS = {
    "man": "man",
    "men": "man",
    "male": "man",
    "woman": "woman",
    "women": "woman",
    "female": "woman",
}


class PromptTableError(ValueError):
    """An imported prompt table with problems; ``problems`` lists each, naming its line."""

    def __init__(self, path, problems: Sequence[str]):
        self.problems = tuple(problems)
        shown = "; ".join(self.problems[:8]) + (
            f"; and {len(self.problems) - 8} more" if len(self.problems) > 8 else ""
        )
        super().__init__(f"prompt table {path} has {len(self.problems)} problem(s): {shown}")


def _parse_group(label: str) -> tuple[str, str] | None:
    """``"White"``, ``"black_women"``, ``"White men"``... -> (group, gender or "unknown")."""
    parts = label.strip().lower().replace("-", "_").replace(" ", "_").split("_")
    race = {g.lower(): g for g in GROUPS}.get(parts[0])
    if race is None or len(parts) > 2:
        return None
    if len(parts) == 1:
        return race, "unknown"
    gender = _GENDER_WORDS.get(parts[1])
    return (race, gender) if gender else None


def _decoded(path: Path) -> str:
    """The file's text; a PromptTableError naming the line of the first byte that is not UTF-8."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        fix = f"iconv -f latin1 -t utf-8 {path.name} > utf8-{path.name}"
        raise PromptTableError(
            path, [f"line {line}: byte 0x{raw[err.start]:02x} is not UTF-8; re-save the file as UTF-8 (e.g. {fix})"]
        ) from None


def _delimiter(header: str) -> str:
    """The delimiter that splits ``header`` into the table's columns: a comma, or else a tab, ';' or '|'."""
    for delimiter in (",", "\t", ";", "|"):
        if sum(part.strip() in TABLE_COLUMNS for part in header.split(delimiter)) >= 2:
            return delimiter
    return ","


def _read_records(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) for every record of a UTF-8 CSV (comma, tab, ';' or '|' delimited) or JSONL file."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise PromptTableError(path, [f"unsupported file type {path.suffix!r}; use .csv or .jsonl"])
    if not path.is_file():
        raise PromptTableError(path, ["no such file"])
    records: list[tuple[int, dict]] = []
    text = _decoded(path)
    with io.StringIO(text, newline="") as handle:
        if suffix == ".jsonl":
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise PromptTableError(path, [f"line {number}: not valid JSON ({err.msg})"]) from None
                if not isinstance(row, dict):
                    raise PromptTableError(
                        path, [f"line {number}: expected a JSON object, got {type(row).__name__}"]
                    )
                records.append((number, row))
            return records
        reader = csv.reader(handle, delimiter=_delimiter(text.split("\n", 1)[0]))
        header = next(reader, None)
        if header is None:
            raise PromptTableError(path, ["the file is empty"])
        header = [h.strip() for h in header]
        if len(header) == 1:
            problem = (
                f"line 1: the header {header[0][:60]!r} is a single column; separate the columns "
                f"{', '.join(TABLE_COLUMNS)} by commas (or tabs, ';' or '|')"
            )
            raise PromptTableError(path, [problem])
        while True:
            start = reader.line_num + 1
            values = next(reader, None)
            if values is None:
                break
            if not values:
                continue
            if len(values) != len(header):
                raise PromptTableError(
                    path, [f"line {start}: {len(values)} fields, but the header has {len(header)}"]
                )
            records.append((start, dict(zip(header, values))))
    return records


def read_prompt_table(
    path: str | Path, *, answer_type: str | Mapping[str, str] | None = None
) -> pd.DataFrame:
    """Read and validate a prompt table (CSV or JSONL); one row per prompt with its ``line``.

    Required columns: ``scenario, variation, name_group, name, context_level, prompt_text``;
    optional ``answer_type`` (else pass ``answer_type``, one type or a scenario -> type mapping;
    matched case-insensitively) and ``higher_favours`` (yes/no, true/false or 1/0: whether a higher
    answer favours the named person; read as a bool column, empty where not given).
    Every problem is collected and reported together, each naming its line: missing columns,
    empty cells, unknown groups, detail levels, answer types or higher_favours values, a name that
    does not occur in its prompt, duplicate rows, and scenarios that lack one of the groups or mix
    answer types or higher_favours values.
    """
    path = Path(path)
    records = _read_records(path)
    if not records:
        raise PromptTableError(path, ["the table has no rows"])
    present = set().union(*(r.keys() for _, r in records))
    missing = [c for c in TABLE_COLUMNS if c not in present]
    if missing:
        raise PromptTableError(path, [f"missing column(s) {missing}; the table has {sorted(present)}"])
    if "answer_type" not in present and answer_type is None:
        hint = f"add the column or pass one of {list(ANSWER_TYPES)}"
        raise PromptTableError(path, [f"no answer_type column and no answer_type given; {hint}"])
    problems, rows, seen = [], [], {}
    for line, raw in records:
        row = {
            c: "" if raw.get(c) is None else str(raw.get(c)).strip()
            for c in (*TABLE_COLUMNS, "answer_type", "higher_favours")
        }
        where = f"line {line}"
        empty = [c for c in TABLE_COLUMNS if not row[c]]
        if empty:
            problems.append(f"{where}: empty {', '.join(empty)}")
            continue
        parsed = _parse_group(row["name_group"])
        if parsed is None:
            problems.append(
                f"{where}: unknown name_group {row['name_group']!r}; use White or Black, optionally with "
                "men/women (e.g. 'white_women')"
            )
            continue
        level = row["context_level"].lower()
        if level not in DETAILS:
            problems.append(
                f"{where}: unknown context_level {row['context_level']!r}; use one of {list(DETAILS)}"
            )
            continue
        kind = (row["answer_type"] or (
            answer_type if isinstance(answer_type, str) else (answer_type or {}).get(row["scenario"], "")
        )).lower()
        if kind not in ANSWER_TYPES:
            problems.append(f"{where}: unknown answer_type {kind!r}; use one of {list(ANSWER_TYPES)}")
            continue
        favours = _YES_NO_WORDS.get(row["higher_favours"].lower()) if row["higher_favours"] else None
        if row["higher_favours"] and favours is None:
            problems.append(f"{where}: higher_favours {row['higher_favours']!r} is not yes/no, true/false or 1/0")
            continue
        if row["name"] not in row["prompt_text"]:
            problems.append(f"{where}: the name {row['name']!r} does not occur in its prompt_text")
            continue
        key = (row["scenario"], row["variation"], level, row["name"])
        if key in seen:
            problems.append(
                f"{where}: duplicates line {seen[key]} (same scenario, variation, context_level, name)"
            )
            continue
        seen[key] = line
        group, gender = parsed
        if gender == "unknown" and (known := lookup(row["name"].split()[0])) is not None:
            gender = known.gender
        rows.append(
            {
                **row,
                "line": line,
                "context_level": level,
                "group": group,
                "gender": gender,
                "answer_type": kind,
                "higher_favours": favours,
            }
        )
    table = pd.DataFrame(rows)
    if not table.empty:
        for scenario, part in table.groupby("scenario", sort=False):
            for group in GROUPS:
                if not (part["group"] == group).any():
                    problems.append(
                        f"line {part['line'].min()}: scenario {scenario!r} has no {group} names, so no gap "
                        "can be measured; add them or drop the scenario"
                    )
            types = sorted(set(part["answer_type"]))
            if len(types) > 1:
                problems.append(
                    f"line {part['line'].min()}: scenario {scenario!r} mixes answer types {types}"
                )
            if part["higher_favours"].nunique() > 1:
                problems.append(
                    f"line {part['line'].min()}: scenario {scenario!r} mixes higher_favours values; give one "
                    "per scenario"
                )
    if problems:
        raise PromptTableError(path, problems)
    return table


def _named(given: Mapping | None, scenarios: list[str], what: str) -> dict:
    """``given`` as a dict, every scenario it names checked to be in the table."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(scenarios))
    if unknown:
        raise ValueError(f"{what} names scenarios {unknown} that the table does not have; its "
                         f"scenarios are {scenarios}")
    return given


def scenario_signs(
    table: pd.DataFrame, higher_favours: bool | Mapping[str, bool] | None = None
) -> dict[str, bool]:
    """Whether a higher answer favours the named person, per scenario of a ``read_prompt_table`` table.

    ``higher_favours`` (one bool for all, or per scenario) comes first, then the table's
    ``higher_favours`` column, then the answer type's default (``HIGHER_FAVOURS``: a rank is better
    low, every other type high). A scenario named in ``higher_favours`` must be in the table.
    """
    scenarios = list(dict.fromkeys(table["scenario"]))
    if isinstance(higher_favours, bool):
        higher_favours = dict.fromkeys(scenarios, higher_favours)
    given = _named(higher_favours, scenarios, "higher_favours")
    signs = {}
    for scenario, part in table.groupby("scenario", sort=False):
        column = part["higher_favours"].dropna()
        default = bool(column.iloc[0]) if len(column) else HIGHER_FAVOURS[part["answer_type"].iloc[0]]
        signs[scenario] = bool(given.get(scenario, default))
    return signs


def scenario_scales(
    table: pd.DataFrame, scales: Mapping[str, tuple[float, float]] | None = None
) -> dict[str, tuple[float, float] | None]:
    """The scale of each scenario of a ``read_prompt_table`` table (``AnswerFormat.scale``: an answer
    beyond it counts at its end), None where ``scales`` names none. A scenario named must be in the
    table and have a numeric answer type."""
    scenarios = list(dict.fromkeys(table["scenario"]))
    given = _named(scales, scenarios, "scales")
    kinds = table.groupby("scenario", sort=False)["answer_type"].first()
    out = {}
    for scenario in scenarios:
        scale = given.get(scenario)
        if scale is not None:
            if kinds[scenario] == "yes_no":
                raise ValueError(f"scenario {scenario!r} has yes/no answers: a scale applies to numbers only")
            scale = tuple(map(float, scale))
            try:
                replace(IMPORT_ANSWERS[kinds[scenario]], scale=scale)  # the format checks it
            except ValueError as err:
                raise ValueError(f"scenario {scenario!r}: {err}") from None
        out[scenario] = scale
    return out


def load_prompt_table(
    path: str | Path,
    model_or_tokenizer,
    *,
    answer_type: str | Mapping[str, str] | None = None,
    higher_favours: bool | Mapping[str, bool] | None = None,
    scales: Mapping[str, tuple[float, float]] | None = None,
    heldout_variations: float = 1 / 3,
    heldout_names: float = 0.25,
    seed: int = 0,
    chat: bool | None = None,
) -> PromptSet:
    """An imported table as a ``PromptSet`` (one context per scenario).

    Each ``prompt_text`` is the question; the answer prefix is generic to the scenario's answer
    type (``IMPORT_ANSWERS``: ``"Answer: $"`` before dollars, ``"Answer: "`` before the other
    numbers, ``"Answer:"`` before yes/no), never another context's wording. The sign convention
    comes from ``scenario_signs`` (``higher_favours`` argument, then column, then type default);
    ``scales`` gives a scenario the range its prompts ask for (``{"chess": (1, 100)}`` for a rank
    among 100 players: ``scenario_scales``).
    """
    table = read_prompt_table(path, answer_type=answer_type)
    signs, ranges = scenario_signs(table, higher_favours), scenario_scales(table, scales)
    chat = uses_chat(model_or_tokenizer) if chat is None else chat
    people = table.drop_duplicates("name")[["name", "group", "gender"]]
    name_split = split_names(people, heldout_fraction=heldout_names, seed=seed)
    frames, answers = [], {}
    for scenario, part in table.groupby("scenario", sort=False):
        kind = part["answer_type"].iloc[0]
        answers[scenario] = replace(IMPORT_ANSWERS[kind], scale=ranges[scenario])
        var_split = split_variations(part["variation"], heldout_fraction=heldout_variations, seed=seed)
        frames.append(
            pd.DataFrame(
                {
                    "prompt_id": scenario
                    + "|"
                    + part["variation"]
                    + "|"
                    + part["context_level"]
                    + "|"
                    + part["name"],
                    "context": scenario,
                    "scenario": scenario,
                    "variation": part["variation"],
                    "detail": part["context_level"],
                    "name": part["name"],
                    "first_name": part["name"].str.split().str[0],
                    "group": part["group"],
                    "gender": part["gender"],
                    "variation_split": part["variation"].map(var_split),
                    "name_split": part["name"].map(name_split),
                    "answer_type": kind,
                    "sign": 1 if signs[scenario] else -1,
                    "user_text": part["prompt_text"],
                    "prompt_text": [
                        format_prompt(model_or_tokenizer, t, IMPORT_ANSWERS[kind].prefix, chat=chat)
                        for t in part["prompt_text"]
                    ],
                    "line": part["line"],
                }
            )
        )
    return PromptSet(pd.concat(frames, ignore_index=True), answers, chat)


__all__ = [
    "HIGHER_FAVOURS",
    "IMPORT_ANSWERS",
    "TABLE_COLUMNS",
    "PromptTableError",
    "load_prompt_table",
    "read_prompt_table",
    "scenario_scales",
    "scenario_signs",
]
