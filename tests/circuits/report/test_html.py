"""The report writer: files on disk, a self-contained HTML page (checked in headless Chromium) and Markdown."""
from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from circuits.evaluate import explore
from circuits.report import plots
from circuits.report.html import ReportPaths, Section, _pipe_table, write_report
from circuits.report.study_report import exploration_sections
from interp.components import ComponentSet, ComponentShape, Neuron

CONTEXTS = ["hiring", "purchase"]


def figure_sections() -> list[Section]:
    """One section per figure function, on tiny synthetic frames."""
    rng = np.random.default_rng(0)
    heads = pd.DataFrame([("head", layer, h, rng.normal()) for layer in range(3) for h in range(4)],
                         columns=["kind", "layer", "index", "score"])
    neurons = pd.DataFrame({"kind": "neuron", "layer": np.repeat(range(3), 50), "index": np.tile(range(50), 3),
                            "score": rng.normal(size=150)})
    sparsity = pd.DataFrame(
        [{"strategy": "none", "k": 0, "eval_context": c, "bias": 0.4} for c in CONTEXTS]
        + [{"strategy": s, "k": k, "eval_context": c, "bias": 0.4 / k, "bias_lo": 0.3 / k, "bias_hi": 0.5 / k}
           for s in ("atp", "random") for k in (1, 10, 100) for c in CONTEXTS]
    )
    generalization = pd.DataFrame([{"train_context": a, "eval_context": b, "share_removed": 0.5 if a == b else 0.2}
                                   for a in CONTEXTS for b in CONTEXTS])
    overlap = pd.DataFrame([{"context_a": "hiring", "context_b": "purchase", "stat": "jaccard", "value": 0.3,
                             "null_mean": 0.05}])
    jaccard = pd.DataFrame([{"pair": "hiring / purchase", "k": k, "jaccard": 0.2, "null_mean": 0.01,
                             "null_lo": 0.0, "null_hi": 0.02} for k in (10, 100)])
    shared = pd.DataFrame({"context": CONTEXTS, "full_share": [0.5, 0.4], "shared_share": [0.2, 0.3]})
    utility = pd.DataFrame([{"strategy": "atp", "k": k, "kl": 0.01 * k, "share_removed": 0.1 * k} for k in (1, 5)])
    audit = pd.DataFrame({"context": CONTEXTS, "gap": [0.1, -0.2], "gap_lo": [0.0, -0.3], "gap_hi": [0.2, -0.1]})
    figures = [
        ("Head scores", plots.attribution_heatmap(heads)),
        ("Neuron scores", plots.attribution_heatmap(neurons, "neuron", top_n=3)),
        ("Top components", plots.top_components(heads, k=5)),
        ("Bias vs sparsity", plots.bias_vs_sparsity(sparsity)),
        ("Generalization", plots.generalization_matrix(generalization)),
        ("Overlap", plots.overlap_matrix(overlap)),
        ("Jaccard vs k", plots.jaccard_curves(jaccard)),
        ("Shared vs specific", plots.shared_specific(shared)),
        ("Utility cost", plots.utility_cost(utility)),
        ("Audit gaps", plots.audit_gaps(audit)),
    ]
    return [Section(title, text=f"About {title.lower()}.", figures=[(title, f"{title} <figure>", fig)])
            for title, fig in figures]


COMPONENTS = pd.DataFrame({"component": ["N1.7", "H0.2", "N2.3", "N1.7"], "context": CONTEXTS * 2,
                           "score": [0.5, -2.0, 10.0, np.nan]})


def component_sections() -> list[Section]:
    """A component table and the card section its ``N1.7`` cells link to, then the study report's exploration
    sections (set comparison, layer profile, a full card of N0.1 and a scores-only card of N0.2)."""
    shape = ComponentShape(n_layers=2, d_mlp=20, n_heads=2)
    sets = {"hiring": ComponentSet([Neuron(0, 1), Neuron(0, 2), Neuron(1, 3)]),
            "purchase": ComponentSet([Neuron(0, 1), Neuron(1, 5)])}
    comparison = explore.compare_sets(sets, shape, n_null=20)
    profile = explore.layer_profile(sets, shape)
    scores = pd.DataFrame({"context": CONTEXTS, "score": [0.3, 0.1], "ci_low": [0.2, 0.0], "ci_high": [0.4, 0.2]})
    activations = pd.DataFrame([{"context": c, "group": g, "position": p, "mean": 1.0, "ci_low": 0.5, "ci_high": 1.5}
                                for c in CONTEXTS for g in ("Black", "White") for p in ("name", "answer")])
    effects = pd.DataFrame([{"context": c, "answer": "digit", "token": str(d), "token_id": 32 + d, "effect": d * 0.1,
                             "centred": d * 0.1 - 0.45} for c in CONTEXTS for d in range(10)])
    top = pd.DataFrame({"context": CONTEXTS, "name": ["Emily", "Jamal"], "activation_name": [2.0, 1.0]})
    cards = {"N0.1": explore.ComponentCard(Neuron(0, 1), scores, activations, effects, top), "N0.2": scores}
    return [Section("Components", tables=[("Top components", COMPONENTS)]),
            Section("Component N1.7", text="Its card.", key="N1.7"),
            *exploration_sections(comparison, profile, cards)]


N_FIGURES = 10 + 3  # one per figure function, then the upset, layer profile and card figures


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> ReportPaths:
    """One report, written once for the module (the tests only read it)."""
    sections = figure_sections()
    sections[0].text = "First paragraph with `code` & <b>markup</b>.\n\n- one bullet\n- another bullet"
    sections[0].tables.append(("Scores | with a pipe", pd.DataFrame({"context": ["a|b", "c"], "score": [0.5, 1.25]})))
    meta = {"model": "SmolLM2-135M <instruct>", "date": "2025-01-01", "settings": {"k": [10, 100], "seed": 0}}
    out = tmp_path_factory.mktemp("report")
    return write_report(out, "Bias circuits & report", sections + component_sections(), meta=meta, dpi=60)


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag, attrs):
        self.links += [(tag, name, value or "") for name, value in attrs if name in ("src", "href")]


def test_files_on_disk(report):
    assert report.html.is_file() and report.markdown.is_file()
    assert len(report.png) == len(report.svg) == N_FIGURES
    assert all(p.is_file() and p.read_bytes().startswith(b"\x89PNG") for p in report.png)
    assert all(p.is_file() and b"<svg" in p.read_bytes()[:500] for p in report.svg)
    assert report.png[0].name == "head-scores.png" and report.png[0].parent == report.out_dir / "figures"


def test_html_is_self_contained_and_escaped(report):
    page = report.html.read_text()
    parser = _Links()
    parser.feed(page)
    images = [value for tag, name, value in parser.links if name == "src"]
    anchors = [value for tag, name, value in parser.links if name == "href"]
    assert len(images) == N_FIGURES and all(src.startswith("data:image/png;base64,") for src in images)
    assert anchors and all(href.startswith("#") for href in anchors)
    assert "<link" not in page and page.count("<script") == 1  # one inline script, nothing loaded
    assert page.count('<a href="#component-n1-7">N1.7</a>') == 2  # both N1.7 cells link to the card
    for section in ("set-comparison", "layer-profile", "component-n0-1", "component-n0-2"):
        assert f'<section id="{section}">' in page
    assert page.count('<a href="#component-n0-1">N0.1</a>') == 1  # in the components-by-intersection table
    assert '<table class="dataframe sortable" id="table-2">' in page
    assert 'data-table="table-2"' in page
    assert "<title>Bias circuits &amp; report</title>" in page
    assert "SmolLM2-135M &lt;instruct&gt;" in page and "&lt;b&gt;markup&lt;/b&gt;" in page
    assert "<code>code</code>" in page and "<li>one bullet</li>" in page
    assert "Head scores &lt;figure&gt;" in page and "a|b" in page
    assert re.findall(r'<section id="([^"]+)"', page)[:2] == ["head-scores", "neuron-scores"]


def test_markdown_links_existing_pngs(report):
    text = report.markdown.read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(links) == N_FIGURES
    for link in links:
        assert not Path(link).is_absolute() and (report.out_dir / link).is_file() and link.endswith(".png")
    assert all((report.out_dir / svg).is_file() for svg in re.findall(r"\[SVG\]\(([^)]+)\)", text))
    assert "a\\|b" in text and "Scores | with a pipe" in text  # pipes inside cells are escaped
    assert "- **model**: SmolLM2-135M &lt;instruct&gt;" in text and "](#head-scores)" in text
    assert "*Figure 1. Head scores &lt;figure&gt;*" in text  # captions are text, not raw HTML


def test_figures_are_closed_and_names_sanitized(tmp_path):
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    other = plots.shared_specific(pd.DataFrame({"context": ["a"], "full_share": [0.5], "shared_share": [0.2]}))
    section = Section("Contents", figures=[("Bias / k (L1)!", "one", fig), ("bias-k-l1", "two", other)])
    paths = write_report(tmp_path, "t", [section, Section("Contents")])
    assert not plt.fignum_exists(fig.number)
    assert [p.name for p in paths.png] == ["bias-k-l1.png", "bias-k-l1-2.png"]
    page = paths.html.read_text()
    assert re.findall(r'<section id="([^"]+)"', page) == ["contents-2", "contents-3"]  # nav owns "contents"


def test_pipe_table_fallback():
    frame = pd.DataFrame({"name": ["x|y", None], "value": np.array([1.23456, np.nan], dtype=np.float32)},
                         index=pd.Index([3, 4], name="i"))
    assert _pipe_table(frame).splitlines() == [
        "| i | name | value |",
        "|---|---|---|",
        "| 3 | x\\|y | 1.235 |",
        "| 4 |  |  |",
    ]


@pytest.mark.usefixtures("unchecked")
def test_bad_sections_are_refused(tmp_path):
    with pytest.raises(ValueError, match="at least one Section"):
        write_report(tmp_path, "t", [])
    with pytest.raises(TypeError, match="\\(name, caption, matplotlib Figure\\)"):
        write_report(tmp_path, "t", [Section("s", figures=[("name", object())])])
    with pytest.raises(TypeError, match="\\(caption, DataFrame\\)"):
        write_report(tmp_path, "t", [Section("s", tables=[("caption", [1, 2])])])


PROBE = """<script>
function interact() {  // sort, filter and follow a card link in the components table (table 2)
  const table = document.getElementById("table-2");
  const header = name => Array.from(table.tHead.rows[0].cells).find(th => th.textContent.trim() === name);
  const column = i => Array.from(table.tBodies[0].rows).map(r => r.cells[i].textContent.trim());
  const visible = () => Array.from(table.tBodies[0].rows).filter(r => !r.hidden).length;
  header("score").click();
  const ascending = column(2);
  header("score").click();
  const descending = column(2);
  header("component").click();
  const by_text = column(0);
  const input = document.querySelector('input[data-table="table-2"]');
  input.value = "Purchase";
  input.dispatchEvent(new Event("input"));
  const filtered = visible();
  input.value = "";
  input.dispatchEvent(new Event("input"));
  const link = table.querySelector("a[href^='#']");
  const target = document.getElementById(link.getAttribute("href").slice(1));
  link.click();
  return {ascending, descending, by_text, filtered, unfiltered: visible(), link_target: target && target.id,
          hash: location.hash};
}
window.addEventListener("load", () => {
  const tableLinks = Array.from(document.querySelectorAll("table a[href^='#']"));
  const images = Array.from(document.images);
  const probe = document.createElement("pre");
  probe.id = "probe";
  probe.textContent = JSON.stringify({
    images: images.length,
    broken: images.filter(img => !img.complete || img.naturalWidth === 0).length,
    sections: Array.from(document.querySelectorAll("section[id]")).map(s => s.id),
    links: tableLinks.map(a => a.getAttribute("href").slice(1)).sort(),
    dangling: tableLinks.filter(a => !document.getElementById(a.getAttribute("href").slice(1))).map(a => a.href),
    ...interact(),
  });
  document.body.appendChild(probe);
});
</script>"""


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="no chromium binary on PATH (install: apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    page = report.html.read_text()
    probed = tmp_path / "probed.html"  # a copy elsewhere: a self-contained page needs nothing beside it
    probed.write_text(page.replace("</body>", PROBE + "</body>"))
    result = subprocess.run(
        [_chromium(), "--headless", "--disable-gpu", "--no-sandbox", "--virtual-time-budget=5000",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", "--dump-dom", probed.as_uri()],
        capture_output=True, text=True, timeout=120, check=False,
    )
    found = re.search(r'<pre id="probe">(.*?)</pre>', result.stdout, re.DOTALL)
    assert found, f"probe missing from the dumped DOM; chromium stderr:\n{result.stderr[-2000:]}"
    probe = json.loads(html.unescape(found.group(1)))
    expected = re.findall(r'<section id="([^"]+)"', page)
    assert probe["sections"] == expected and len(expected) == 16
    assert probe["images"] == N_FIGURES and probe["broken"] == 0
    assert probe["links"] == ["component-n0-1", "component-n0-2", "component-n1-7", "component-n1-7"]
    assert probe["dangling"] == []
    assert probe["ascending"] == ["-2", "0.5", "10", ""] and probe["descending"] == ["10", "0.5", "-2", ""]
    assert probe["by_text"] == ["H0.2", "N1.7", "N1.7", "N2.3"]
    assert probe["filtered"] == 2 and probe["unfiltered"] == 4
    assert probe["link_target"] == "component-n1-7" and probe["hash"] == "#component-n1-7"


def test_audit_section_states_what_share_of_answers_the_metric_sees():
    from circuits.measure.audit import AuditResult
    from circuits.measure.bias import GapTable, Measurement
    from circuits.report.study_report import _audit_section

    values = pd.DataFrame({"context": ["loan", "loan", "vote"], "answer_type": ["dollars", "dollars", "yes_no"],
                           "grid_mass": [0.9, 0.96, 0.5], "other_mass": [0.08, 0.02, 0.5],
                           "tail_mass": [0.02, 0.02, 0.0]})
    gaps = pd.DataFrame([{"context": c, "group_a": "White", "group_b": "Black", "mean_a": 1.0, "mean_b": 0.5,
                          "gap": 0.5, "ci_low": 0.1, "ci_high": 0.9, "smd": 0.3, "p_permutation": 0.04,
                          "n_prompts": 8, "mean_grid_mass": 0.9} for c in ("loan", "vote")])
    section = _audit_section(AuditResult(Measurement(values, pd.DataFrame()), GapTable(gaps)))
    assert "- loan: the metric sees 93% of the model's answers (lowest prompt 90%)" in section.text
    assert "- vote: the metric sees 50%" in section.text
    captions = [caption for caption, _ in section.tables]
    coverage = dict(section.tables)["Covered share of the model's answers per context"]
    assert len(captions) == 2 and coverage["covered"].tolist() == [0.93, 0.5]
    (_, _, figure), = section.figures
    bars = figure.axes[0].containers[0]  # the SMD 0.3 of a gap 0.5 (pooled SD 5/3): interval [0.06, 0.54]
    np.testing.assert_allclose(bars.lines[2][0].get_segments()[0][:, 0], [0.06, 0.54])
