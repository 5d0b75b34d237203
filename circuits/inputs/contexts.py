"""Decision contexts: question templates, their variations, detail levels, answer formats and grids.

A ``Context`` asks a model for a decision about a named person. Its ``template`` has three slots:
``{name}`` (the person), ``{item}`` (what varies between the context's variations: the item sold,
the job, the loan purpose...) and ``{details}`` (empty at detail level ``low``, a qualitative
sentence at ``high``, a numeric anchor at ``numeric``). The ``answer`` says how the model answers:
an instruction ending the question and a prefix that starts the answer, ending right before the
answer itself (``"$"`` before the digits). The answers scored are the model's own (see
``circuits.measure.bias.answer_candidates``); an ``AnswerGrid`` fixes them to a list of strings instead.

In a fixed grid no candidate is a string prefix of another, so candidates are mutually exclusive
continuations, unless the grid is ``terminated``: each candidate is then followed by the end of the
answer (end of turn for chat models, a newline otherwise).

The built-in contexts are data: ``circuits/data/contexts.toml``, read by ``load_contexts``.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, replace
from pathlib import Path

DETAILS = ("low", "high", "numeric")
ANSWER_TYPES = ("dollars", "percent", "probability", "score", "rank", "yes_no")
# Decimals read per numeric answer type (dollars: cents, and "1.5k"; a probability's "0." is in
# the prefix, so its decimals are the answer); further decimals are not read ("12.345" is 12.34).
DECIMALS = {"dollars": 2, "percent": 2, "probability": 3, "score": 1, "rank": 0}


@dataclass(frozen=True)
class AnswerGrid:
    """Candidate answers (text exactly as it follows the answer prefix) and their numeric values."""

    texts: tuple[str, ...]
    values: tuple[float, ...]
    terminated: bool = False

    def __post_init__(self):
        if len(self.texts) != len(self.values) or len(self.texts) < 2:
            raise ValueError(
                f"a grid needs at least 2 candidates with one value each; got {len(self.texts)} texts "
                f"and {len(self.values)} values"
            )
        if len(set(self.texts)) != len(self.texts):
            raise ValueError(f"grid candidates repeat: {list(self.texts)}")
        if not self.terminated:
            clash = [(a, b) for a in self.texts for b in self.texts if a != b and b.startswith(a)]
            if clash:
                raise ValueError(
                    f"candidate {clash[0][0]!r} is a prefix of {clash[0][1]!r}, so their probabilities "
                    "overlap; change the grid or make it terminated"
                )

    @classmethod
    def numbers(cls, values: tuple[float, ...], fmt: str = "{:,.0f}", suffix: str = "", **kw) -> AnswerGrid:
        """A grid whose texts are ``values`` formatted with ``fmt`` plus ``suffix``."""
        return cls(tuple(fmt.format(v) + suffix for v in values), tuple(float(v) for v in values), **kw)


@dataclass(frozen=True)
class AnswerFormat:
    """How the model answers: the question's closing instruction, the answer prefix and, only to
    fix the answers scored, a grid (None: the model's own answers).

    ``scale``: the ``(low, high)`` range the instruction asks for (``"a rank from 1 to 100"``), or
    None. An answer beyond it counts at its end (``on_scale``: rank 126 reads as 100), in the metric
    and in parsed sampled replies alike, so a partial number already past ``high`` is one answer."""

    type: str
    instruction: str
    prefix: str
    grid: AnswerGrid | None = None
    scale: tuple[float, float] | None = None

    def __post_init__(self):
        if self.type not in ANSWER_TYPES:
            raise ValueError(f"unknown answer type {self.type!r}; choose from {list(ANSWER_TYPES)}")
        if self.scale is not None:
            low, high = self.scale
            if not low < high:
                raise ValueError(f"a {self.type} scale must be (low, high) with low < high, got {self.scale}")

    def on_scale(self, value: float | None) -> float | None:
        """``value`` clipped to ``scale`` (None and NaN stay)."""
        if self.scale is None or value is None:
            return value
        return min(max(value, self.scale[0]), self.scale[1]) if value == value else value


@dataclass(frozen=True)
class Variation:
    """One variation of a context: the ``{item}`` text, its qualitative detail, its numeric anchor."""

    key: str
    item: str
    high: str
    anchor: str


@dataclass(frozen=True)
class Context:
    """A decision about a named person, asked in several variations and three detail levels.

    ``higher_favours``: whether a higher answer value favours the named person (a larger loan
    favours the applicant; a higher rent disfavours the tenant). ``sign`` is +1 or -1 accordingly.
    """

    name: str
    scenario: str
    description: str
    template: str
    numeric_detail: str
    variations: tuple[Variation, ...]
    answer: AnswerFormat
    higher_favours: bool

    def __post_init__(self):
        keys = [v.key for v in self.variations]
        if len(keys) < 6 or len(set(keys)) != len(keys):
            raise ValueError(f"context {self.name!r} needs at least 6 distinct variations, got {keys}")
        if "{name}" not in self.template:
            raise ValueError(f"context {self.name!r}: the template must hold {{name}}")
        for slot in ("{item}", "{details}"):
            if self.template.count(slot) != 1:
                raise ValueError(f"context {self.name!r}: the template must hold {slot} exactly once")

    @property
    def sign(self) -> int:
        return 1 if self.higher_favours else -1

    @property
    def variation_keys(self) -> tuple[str, ...]:
        return tuple(v.key for v in self.variations)

    def variation(self, key: str) -> Variation:
        for v in self.variations:
            if v.key == key:
                return v
        raise KeyError(f"context {self.name!r} has no variation {key!r}; it has {list(self.variation_keys)}")

    def details(self, variation: Variation, detail: str) -> str:
        if detail == "low":
            return ""
        if detail == "high":
            return variation.high + " "
        if detail == "numeric":
            return self.numeric_detail.format(anchor=variation.anchor) + " "
        raise ValueError(f"unknown detail level {detail!r}; choose from {list(DETAILS)}")

    def render(self, variation: str | Variation, detail: str, name: str) -> str:
        """The question (user message) about ``name``, ending with the answer instruction."""
        var = self.variation(variation) if isinstance(variation, str) else variation
        body = self.template.format(name=name, item=var.item, details=self.details(var, detail))
        return f"{body} {self.answer.instruction}"


CONTEXTS_FILE = Path(__file__).parents[1] / "data" / "contexts.toml"


def _fields(
    table: object,
    where: str,
    required: tuple[str, ...],
    optional: tuple[str, ...] = (),
    types: dict[str, type] | None = None,
) -> dict:
    """``table`` checked to be a table with every ``required`` key, no key but those and ``optional``,
    and values of the ``types`` given (a string where none is given)."""
    if not isinstance(table, dict):
        raise TypeError(f"{where} must be a table, got {type(table).__name__}")
    missing = [k for k in required if k not in table]
    if missing:
        raise ValueError(f"{where} lacks {', '.join(missing)}")
    unknown = sorted(set(table) - set(required) - set(optional))
    if unknown:
        raise ValueError(
            f"{where} has unknown {', '.join(unknown)}; allowed: {', '.join(required + optional)}"
        )
    for key, value in table.items():
        kind = (types or {}).get(key, str)
        if not isinstance(value, kind):
            raise TypeError(f"{where}: {key} must be a {kind.__name__}, got {value!r}")
    return table


def _answer_format(kind: str, entry: object) -> AnswerFormat:
    where = f"[answers.{kind}]"
    entry = dict(_fields(entry, where, ("instruction", "prefix"), ("scale",), {"scale": list}))
    if "scale" in entry:
        scale = entry["scale"]
        if len(scale) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scale):
            raise ValueError(f"{where}: scale must be two numbers [low, high], got {scale!r}")
        entry["scale"] = (float(scale[0]), float(scale[1]))
    try:
        return AnswerFormat(kind, **entry)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def _scenario(name: str, entry: object) -> dict:
    entry = _fields(entry, f"[scenarios.{name}]", ("variations",), ("setup",), {"variations": list})
    variations = tuple(
        Variation(**_fields(v, f"[scenarios.{name}] variation {i + 1}", ("key", "item", "high", "anchor")))
        for i, v in enumerate(entry["variations"])
    )
    return {**entry, "variations": variations}


def _context(name: str, entry: object, scenarios: dict, answers: dict[str, AnswerFormat]) -> Context:
    where = f"[contexts.{name}]"
    entry = _fields(
        entry,
        where,
        ("scenario", "description", "question", "numeric", "answer", "higher_favours"),
        ("setup", "answer_prefix"),
        {"higher_favours": bool},
    )
    scenario = scenarios.get(entry["scenario"])
    if scenario is None:
        raise ValueError(f"{where}: unknown scenario {entry['scenario']!r}; the file has {list(scenarios)}")
    if ("setup" in entry) == ("setup" in scenario):
        raise ValueError(f"{where}: give the setup here or in [scenarios.{entry['scenario']}], not both")
    if entry["answer"] not in answers:
        raise ValueError(f"{where}: unknown answer {entry['answer']!r}; the file has {list(answers)}")
    answer = answers[entry["answer"]]
    if "answer_prefix" in entry:
        answer = replace(answer, prefix=entry["answer_prefix"])
    setup = entry.get("setup", scenario.get("setup"))
    return Context(
        name,
        entry["scenario"],
        entry["description"],
        f"{setup} {{details}}{entry['question']}",
        entry["numeric"],
        scenario["variations"],
        answer,
        entry["higher_favours"],
    )


def load_contexts(path: Path = CONTEXTS_FILE) -> tuple[dict[str, Context], dict[str, AnswerFormat]]:
    """The contexts, by name, and the answer format of each answer type, read from a TOML file laid
    out like ``circuits/data/contexts.toml`` (its header says how). A malformed file raises a
    ValueError naming the file and the entry."""
    sections = ("answers", "scenarios", "contexts")
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        data = _fields(data, "the file", sections, types=dict.fromkeys(sections, dict))
        answers = {
            kind: _answer_format(kind, entry) for kind, entry in data["answers"].items()
        }
        scenarios = {name: _scenario(name, entry) for name, entry in data["scenarios"].items()}
        contexts = {
            name: _context(name, entry, scenarios, answers) for name, entry in data["contexts"].items()
        }
    except (OSError, TypeError, ValueError) as err:  # a TOMLDecodeError is a ValueError
        raise ValueError(f"context file {path}: {err}") from None
    return contexts, answers


# The registered contexts, and the answer format of each answer type that they start from.
CONTEXTS, DEFAULT_ANSWERS = load_contexts()


class UnknownContextError(KeyError):
    """A context name that is not registered; the message lists the known ones."""

    def __str__(self) -> str:
        return str(self.args[0])


def get_context(name: str | Context) -> Context:
    """The registered context called ``name`` (a ``Context`` passes through)."""
    if isinstance(name, Context):
        return name
    try:
        return CONTEXTS[name]
    except KeyError:
        raise UnknownContextError(
            f"unknown context {name!r}; known contexts: {', '.join(CONTEXTS)}"
        ) from None


__all__ = [
    "ANSWER_TYPES",
    "CONTEXTS",
    "CONTEXTS_FILE",
    "DECIMALS",
    "DEFAULT_ANSWERS",
    "DETAILS",
    "AnswerFormat",
    "AnswerGrid",
    "Context",
    "UnknownContextError",
    "Variation",
    "get_context",
    "load_contexts",
]
