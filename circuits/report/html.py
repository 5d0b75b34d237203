"""The study report: figures as PNG + SVG files, one self-contained HTML page and a Markdown twin.

A report is a title, optional metadata (model, date, settings) and a list of :class:`Section`s, each
with Markdown-ish text (paragraphs separated by blank lines, ``- `` bullet lists, ```code``` spans),
captioned tables and captioned figures. In the HTML page every table sorts by a click on a column
header and filters rows by the text typed above it (a small inline script, no server), and a table
cell that reads exactly a section's ``key`` (e.g. a component's ``N12.345``) links to that section.
:func:`write_report` writes::

    out_dir/figures/<name>.png, <name>.svg   one pair per figure (names sanitized, repeats numbered)
    out_dir/report.html                      figures embedded as base64 PNG, no external resources
    out_dir/report.md                        relative links to figures/*.png
"""
from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; line-height: 1.5; color: #222;
       max-width: 72rem; margin: 0 auto; padding: 1rem 2rem 4rem; }
header { border-bottom: 2px solid #ddd; margin-bottom: 1rem; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: 0.15rem 1rem; font-size: 0.9rem; }
dl.meta dt { font-weight: 600; color: #555; }
dl.meta dd { margin: 0; font-family: ui-monospace, monospace; overflow-wrap: anywhere; }
nav ol { columns: 2; font-size: 0.95rem; }
section { border-top: 1px solid #eee; padding-top: 0.5rem; margin-top: 2rem; }
figure { margin: 1.5rem 0; }
figure img { max-width: 100%; height: auto; display: block; }
figcaption { font-size: 0.9rem; color: #444; margin: 0.3rem 0; }
.table-wrap { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.85rem; font-variant-numeric: tabular-nums; }
th, td { border-bottom: 1px solid #ddd; padding: 0.2rem 0.6rem; text-align: right; }
th { background: #f4f4f4; }
th:first-child, td:first-child { text-align: left; }
tbody tr:nth-child(even) { background: #fafafa; }
code { background: #f3f3f3; padding: 0 0.2rem; border-radius: 3px; }
table.sortable thead th { cursor: pointer; }
th[aria-sort="ascending"]::after { content: " \\25B2"; }
th[aria-sort="descending"]::after { content: " \\25BC"; }
input.table-filter { font: inherit; font-size: 0.85rem; margin: 0.2rem 0; padding: 0.1rem 0.3rem; }
"""

SCRIPT = """
document.querySelectorAll("table.sortable").forEach(table => {
  const body = table.tBodies[0], head = table.tHead.rows[0];
  Array.from(head.cells).forEach((th, col) => {
    th.addEventListener("click", () => {
      const up = th.getAttribute("aria-sort") !== "ascending";
      Array.from(head.cells).forEach(c => c.removeAttribute("aria-sort"));
      th.setAttribute("aria-sort", up ? "ascending" : "descending");
      const text = r => (r.cells[col] ? r.cells[col].textContent.trim() : "");
      const rows = Array.from(body.rows);
      const numeric = rows.every(r => text(r) === "" || !isNaN(Number(text(r))));
      const order = (a, b) => {
        if (!numeric) return up ? a.localeCompare(b) : b.localeCompare(a);
        if (a === "" || b === "") return (a === "") - (b === "");  // blanks last
        return up ? Number(a) - Number(b) : Number(b) - Number(a);
      };
      rows.sort((a, b) => order(text(a), text(b))).forEach(r => body.appendChild(r));
    });
  });
});
document.querySelectorAll("input.table-filter").forEach(input => {
  const table = document.getElementById(input.dataset.table);
  input.addEventListener("input", () => {
    const query = input.value.trim().toLowerCase();
    Array.from(table.tBodies[0].rows).forEach(r => {
      r.hidden = query !== "" && !r.textContent.toLowerCase().includes(query);
    });
  });
});
"""


@dataclass
class Section:
    """One report section: ``tables`` are ``(caption, frame)``; ``figures`` are ``(name, caption, fig)``.

    ``key``: table cells (in the HTML page) that read exactly this text link to the section.
    """

    title: str
    text: str = ""
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)
    figures: list[tuple[str, str, Figure]] = field(default_factory=list)
    key: str = ""


@dataclass(frozen=True)
class ReportPaths:
    """Where :func:`write_report` put things; ``png``/``svg`` follow the figures' order in the report."""

    out_dir: Path
    html: Path
    markdown: Path
    png: tuple[Path, ...]
    svg: tuple[Path, ...]


def write_report(
    out_dir: str | Path,
    title: str,
    sections: Sequence[Section],
    *,
    meta: Mapping[str, object] | None = None,
    dpi: int = 150,
) -> ReportPaths:
    """Write the figures (PNG + SVG), ``report.html`` and ``report.md`` under ``out_dir``.

    Every figure is closed once saved. Section ids and figure file names are slugs of the titles and
    names (``"Bias vs k (L1)"`` -> ``bias-vs-k-l1``), numbered ``-2``, ``-3``... when they repeat.
    """
    sections = list(sections)
    _check_sections(sections)
    out_dir = Path(out_dir)
    figure_dir = out_dir / "figures"
    figure_dir.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})

    section_ids = _unique_slugs((s.title for s in sections), reserved=["contents"])
    stems = iter(_unique_slugs(name for s in sections for name, _, _ in s.figures))
    saved: list[list[tuple[str, Path, Path, bytes]]] = []  # per section: (caption, png, svg, png bytes)
    for section in sections:
        files = []
        for _, caption, fig in section.figures:
            stem = next(stems)
            png, svg = figure_dir / f"{stem}.png", figure_dir / f"{stem}.svg"
            with matplotlib.rc_context({"svg.hashsalt": stem}):  # stable ids, so reruns give identical SVGs
                fig.savefig(png, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
                fig.savefig(svg, format="svg", bbox_inches="tight", metadata={"Date": None})
            plt.close(fig)
            files.append((caption, png, svg, png.read_bytes()))
        saved.append(files)

    html_path = out_dir / "report.html"
    html_path.write_text(_html(title, meta, sections, section_ids, saved), encoding="utf-8")
    md_path = out_dir / "report.md"
    md_path.write_text(_markdown(title, meta, sections, section_ids, saved, out_dir), encoding="utf-8")
    return ReportPaths(
        out_dir=out_dir,
        html=html_path,
        markdown=md_path,
        png=tuple(f[1] for files in saved for f in files),
        svg=tuple(f[2] for files in saved for f in files),
    )


def _check_sections(sections: list[Section]) -> None:
    if not sections:
        raise ValueError("write_report() needs at least one Section")
    for s in sections:
        if not isinstance(s, Section):
            raise TypeError(f"write_report() expects Section objects, got {type(s).__name__}")
        for entry in s.tables:
            if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], pd.DataFrame)):
                raise TypeError(f"section {s.title!r}: tables must be (caption, DataFrame) pairs, got {entry!r}")
        for entry in s.figures:
            if not (isinstance(entry, tuple) and len(entry) == 3 and isinstance(entry[2], Figure)):
                raise TypeError(
                    f"section {s.title!r}: figures must be (name, caption, matplotlib Figure) triples, got {entry!r}"
                )


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-") or "item"


def _unique_slugs(texts, reserved: Sequence[str] = ()) -> list[str]:
    taken, slugs = set(reserved), []
    for text in texts:
        base = slug = _slug(text)
        n = 1
        while slug in taken:
            n += 1
            slug = f"{base}-{n}"
        taken.add(slug)
        slugs.append(slug)
    return slugs


def _meta_value(value: object) -> str:
    if isinstance(value, (Mapping, list, tuple)):
        return json.dumps(value, default=str)
    return str(value)


def _show_index(frame: pd.DataFrame) -> bool:
    """Whether the index carries information (anything but the default 0..n-1 range)."""
    return not (isinstance(frame.index, pd.RangeIndex) and frame.index.start == 0 and frame.index.step == 1
                and frame.index.name is None)


# ---------------------------------------------------------------- HTML


def _html_text(text: str) -> str:
    """Markdown-ish text to HTML: blank-line separated paragraphs, ``- `` bullet lists, `code` spans."""
    def inline(s: str) -> str:
        return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(s))

    blocks = []
    for block in re.split(r"\n\s*\n", text.strip()):
        lines = [line.strip() for line in block.splitlines() if line.strip()]
        if not lines:
            continue
        if all(line.startswith(("- ", "* ")) for line in lines):
            blocks.append("<ul>" + "".join(f"<li>{inline(line[2:])}</li>" for line in lines) + "</ul>")
        else:
            blocks.append(f"<p>{inline(' '.join(lines))}</p>")
    return "\n".join(blocks)


def _html_table(frame: pd.DataFrame, table_id: str, links: Mapping[str, str]) -> str:
    """A sortable table with a filter box; cells reading exactly a key of ``links`` link to its section id."""
    table = frame.to_html(
        index=_show_index(frame), border=0, escape=True, na_rep="", float_format=lambda v: f"{v:.4g}",
        table_id=table_id, classes="sortable",
    )
    if links:
        anchors = {html.escape(k): f'<a href="#{sid}">{html.escape(k)}</a>' for k, sid in links.items()}
        table = re.sub(r"<td>([^<]*)</td>", lambda m: f"<td>{anchors.get(m.group(1), m.group(1))}</td>", table)
    box = (f'<input type="search" class="table-filter" data-table="{table_id}" placeholder="Filter rows" '
           f'aria-label="Filter the rows of {table_id}">')
    return box + table


def _html(title, meta, sections, section_ids, saved) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title><style>{CSS}</style></head><body>",
        f"<header><h1>{e(title)}</h1>",
    ]
    if meta:
        parts.append('<dl class="meta">')
        parts += [f"<dt>{e(str(k))}</dt><dd>{e(_meta_value(v))}</dd>" for k, v in meta.items()]
        parts.append("</dl>")
    parts.append('</header><nav id="contents"><h2>Contents</h2><ol>')
    parts += [f'<li><a href="#{sid}">{e(s.title)}</a></li>' for s, sid in zip(sections, section_ids)]
    parts.append("</ol></nav><main>")
    n_table = n_figure = 0
    links = {s.key: sid for s, sid in zip(sections, section_ids) if s.key}
    for section, sid, files in zip(sections, section_ids, saved):
        parts.append(f'<section id="{sid}"><h2>{e(section.title)}</h2>')
        if section.text:
            parts.append(_html_text(section.text))
        for caption, frame in section.tables:
            n_table += 1
            parts.append(
                f'<figure class="table"><figcaption>Table {n_table}. {e(caption)}</figcaption>'
                f'<div class="table-wrap">{_html_table(frame, f"table-{n_table}", links)}</div></figure>'
            )
        for caption, _, _, png in files:
            n_figure += 1
            data = base64.b64encode(png).decode("ascii")
            parts.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{e(caption)}">'
                f"<figcaption>Figure {n_figure}. {e(caption)}</figcaption></figure>"
            )
        parts.append("</section>")
    parts.append(f"</main><script>{SCRIPT}</script></body></html>")
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------- Markdown


def _md_cell(text: str) -> str:
    return html.escape(text, quote=False).replace("|", r"\|").replace("\n", " ")


def _pipe_table(frame: pd.DataFrame) -> str:
    """A GitHub-style pipe table, for when ``tabulate`` (behind ``DataFrame.to_markdown``) is missing."""
    if _show_index(frame):
        frame = frame.reset_index()

    def cell(value: object) -> str:
        if pd.api.types.is_float(value):
            return "" if pd.isna(value) else f"{value:.4g}"
        return "" if value is None or value is pd.NA else _md_cell(str(value))

    header = [cell(c) for c in frame.columns]
    rows = [[cell(v) for v in row] for row in frame.itertuples(index=False)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _markdown_table(frame: pd.DataFrame) -> str:
    def escape(value: object) -> object:
        return _md_cell(value) if isinstance(value, str) else value

    try:
        return frame.map(escape).rename(columns=escape).to_markdown(index=_show_index(frame), floatfmt=".4g")
    except ImportError:  # no tabulate
        return _pipe_table(frame)


def _md_escape(text: object) -> str:
    """Plain text for Markdown: no raw HTML, no link brackets, one line."""
    return re.sub(r"([\[\]])", r"\\\1", html.escape(str(text), quote=False)).replace("\n", " ")


def _markdown(title, meta, sections, section_ids, saved, out_dir: Path) -> str:
    lines = [f"# {_md_escape(title)}", ""]
    if meta:
        lines += [f"- **{_md_escape(k)}**: {_md_escape(_meta_value(v))}" for k, v in meta.items()] + [""]
    lines += ["## Contents", ""]
    lines += [f"{i}. [{_md_escape(s.title)}](#{sid})" for i, (s, sid) in enumerate(zip(sections, section_ids), 1)]
    n_table = n_figure = 0
    for section, sid, files in zip(sections, section_ids, saved):
        lines += ["", f'<a id="{sid}"></a>', "", f"## {_md_escape(section.title)}", ""]
        if section.text:
            lines += [section.text.strip(), ""]
        for caption, frame in section.tables:
            n_table += 1
            lines += [f"*Table {n_table}. {_md_escape(caption)}*", "", _markdown_table(frame), ""]
        for caption, png, svg, _ in files:
            n_figure += 1
            png_link, svg_link = png.relative_to(out_dir).as_posix(), svg.relative_to(out_dir).as_posix()
            lines += [
                f"![{_md_escape(caption)}]({png_link})",
                "",
                f"*Figure {n_figure}. {_md_escape(caption)}* ([SVG]({svg_link}))",
                "",
            ]
    return "\n".join(lines).rstrip() + "\n"
