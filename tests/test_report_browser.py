"""The report as a browser shows it: a real pairs-mode run (MiniLM, the local executor), its
report rendered by headless Chromium, every image decoded, the funnel equal to the manifest."""

from __future__ import annotations

import html
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tasks.report import COUNTS, SAMPLE_SIZE, build_report, funnel_rows, kept_because
from tests.browser import dump_dom, ensure_chromium, screenshot
from tests.conftest import pairs_mode_config
from tests.helpers import sample_rows

WINDOW = (1280, 4000)
# appended to a copy of the report: after load, each image's decoded size, written into the DOM
IMG_CHECK = """<script>
window.addEventListener("load", () => {
  const pre = document.createElement("pre");
  pre.id = "imgcheck";
  pre.textContent = JSON.stringify(Array.from(document.images, (img) => ({
    id: img.id, width: img.naturalWidth, height: img.naturalHeight, complete: img.complete,
  })));
  document.body.appendChild(pre);
});
</script>"""
BROKEN_IMG = (
    '<img id="broken" alt="a control that must not decode" src="data:image/png;base64,AAAA">'
)


class Collect(HTMLParser):
    """The tags the checks read: figures, images, the funnel table's rows, the sample's rows."""

    def __init__(self) -> None:
        super().__init__()
        self.figures: list[str | None] = []
        self.images: list[dict[str, str | None]] = []
        self.funnel: list[tuple[str, dict[str, int]]] = []
        self.sample_queries: list[str] = []
        self.sample_rows = 0
        self._table: str | None = None
        self._count: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "figure":
            self.figures.append(a.get("id"))
        elif tag == "img":
            self.images.append(a)
        elif tag == "table":
            self._table = a.get("id")
        elif tag == "tr" and self._table == "funnel-table" and "data-stage" in a:
            self.funnel.append((a["data-stage"], {}))
        elif tag == "tr" and self._table == "sample-table":
            self.sample_rows += 1
            if "data-query-id" in a:
                self.sample_queries.append(a["data-query-id"])
        elif tag == "td" and self._table == "funnel-table":
            self._count = a.get("data-count")

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
        elif tag == "td":
            self._count = None

    def handle_data(self, data):
        if self._count and self.funnel:
            self.funnel[-1][1][self._count] = int(data)


@pytest.fixture(scope="module")
def chromium() -> str:
    path, how = ensure_chromium()
    if path is None:
        pytest.skip(f"no headless Chromium: {how}")
    print(f"chromium: {path} ({how})")
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """pairs mode with something in every part of the funnel: a bad pair and a too-short
    passage (rejected), an exact copy (deduplicated) and a near copy (a cluster)."""
    from flows.build import run_local
    from tasks.embedder import Embedder, resolve_precision
    from tasks.models import minilm_path

    tmp = tmp_path_factory.mktemp("report")
    rows = sample_rows(40)
    pairs = [{"query": f"what does {r['title']} do", "positive": r["text"]} for r in rows[:12]]
    pairs.append({"query": None, "positive": rows[0]["text"]})
    corpus = [{"text": r["text"]} for r in rows[12:]]
    words = rows[13]["text"].split()
    corpus += [
        {"text": rows[12]["text"].upper() + "!!"},  # an exact copy once folded
        {"text": " ".join(words[:-1] + ["(copy)"])},  # a near copy
        {"text": "short"},
    ]
    cfg = pairs_mode_config(
        tmp,
        pairs,
        corpus,
    )
    embedder = Embedder(
        str(minilm_path()), "all-MiniLM-L6-v2", "cpu", 2, resolve_precision("auto", "cpu")
    )
    path, _ = run_local(cfg, embedder=embedder)
    return path


@pytest.fixture(scope="module")
def report(run_dir) -> tuple[Path, Collect]:
    page = build_report(run_dir)
    parsed = Collect()
    parsed.feed(page.read_text())
    return page, parsed


@pytest.mark.slow
def test_every_figure_has_an_id_and_alt_text_and_the_funnel_is_the_manifest(run_dir, report):
    page, parsed = report
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert len(parsed.figures) >= 6 and None not in parsed.figures
    assert len(set(parsed.figures)) == len(parsed.figures)
    for name in ("funnel", "cluster_sizes", "query_length", "scores", "rejects"):
        assert f"fig-{name}" in parsed.figures, name
    assert len(parsed.images) == len(parsed.figures)  # one image per figure, no stray ones
    for img in parsed.images:
        assert img.get("id") and len(img.get("alt") or "") > 20, img.get("id")
        assert img["src"].startswith("data:image/png;base64,")  # self-contained
    assert 'src="http' not in page.read_text() and "<link" not in page.read_text()
    pngs = {p.stem for p in (run_dir / "report").glob("*.png")}
    assert {f"fig-{p}" for p in pngs} == set(parsed.figures)

    st = manifest["stages"]
    assert [name for name, _ in parsed.funnel] == list(st)  # pipeline order
    for name, counts in parsed.funnel:
        assert counts == {k: st[name][k] for k in COUNTS}, name
    assert st["ingest"]["rejected"] == 2 and st["dedup"]["deduplicated"] == 1  # all shown
    alt = next(i["alt"] for i in parsed.images if i["id"] == "img-funnel")
    assert "ingest: " + f"{st['ingest']['rows_in']} in" in html.unescape(alt)

    import duckdb

    con = duckdb.connect()
    triplets = f"read_parquet('{run_dir.as_posix()}/triplets/*.parquet')"
    first = con.execute(
        f"SELECT query_id, len(negatives) FROM {triplets} ORDER BY query_id LIMIT {SAMPLE_SIZE}"
    ).fetchall()
    assert parsed.sample_queries == [q for q, _ in first]  # deterministic: the first by id
    assert parsed.sample_rows == 1 + sum(n for _, n in first)  # the header + one per negative
    negatives = sum(n for _, n in first)
    assert page.read_text().count('<td class="why">passed every filter; mined, rank ') == negatives


@pytest.mark.slow
def test_chromium_renders_the_report_and_every_image_decodes(chromium, report, tmp_path):
    page, parsed = report
    shot = tmp_path / "report.png"
    done = screenshot(chromium, page, shot, WINDOW)
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size == WINDOW
        gray = im.convert("L")
        pixels = gray.width * gray.height
        dark = sum(gray.histogram()[:200])  # text, bars, axes: anything clearly not white
        assert gray.getextrema()[0] < 60 and dark > pixels * 0.01, "the screenshot is blank"
        lower = gray.crop((0, WINDOW[1] // 2, gray.width, gray.height))
        assert lower.getextrema()[0] < 60, "nothing drawn in the lower half of the page"
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 50  # plots: colour

    check = tmp_path / "imgcheck.html"
    text = page.read_text()
    check.write_text(text.replace("</body>", BROKEN_IMG + IMG_CHECK + "</body>"))
    dom = dump_dom(chromium, check)
    found = re.search(r'<pre id="imgcheck">(.*?)</pre>', dom, re.S)
    assert found, dom[-2000:]
    images = json.loads(html.unescape(found.group(1)))
    broken = [i for i in images if i["id"] == "broken"]
    assert broken and broken[0]["width"] == 0  # the check can see an image that did not load
    figures = [i for i in images if i["id"] != "broken"]
    assert len(figures) == len(parsed.figures)
    assert [i["id"] for i in figures] == [f.replace("fig-", "img-") for f in parsed.figures]
    for img in figures:
        assert img["complete"] and img["width"] > 0 and img["height"] > 0, img


def test_funnel_rows_keep_the_pipeline_order():
    manifest = {
        "stages": {
            "ingest": {"rows_in": 5, "rows_out": 3, "rejected": 1, "deduplicated": 1},
            "dedup": {"rows_in": 3, "rows_out": 3, "rejected": 0, "deduplicated": 0, "seconds": 2},
        }
    }
    assert funnel_rows(manifest) == [("ingest", 5, 3, 1, 1, 0.0), ("dedup", 3, 3, 0, 0, 2.0)]


def test_kept_because_says_what_let_a_negative_through():
    mined = kept_because("mined", None, 2, 0.61, "true_negative", "off topic", True, None, True)
    assert mined == (
        "passed every filter; mined, rank 2 among the eligible (0 = the hardest); a sibling of "
        "the positive "
        "(Jaccard 0.61); judge: true_negative: off topic"
    )
    written = kept_because("generated", 1, None, None, None, None, True, None, True)
    assert written == "passed every filter; written by the LLM at grade 1"
    assert kept_because("mined", None, 1, None, None, None, None, None, False) == (
        "no candidates row"
    )


def test_without_chromium_and_not_root_the_browser_tests_skip_with_a_reason(monkeypatch):
    import tests.browser as browser

    monkeypatch.setattr(browser.shutil, "which", lambda name: None)
    monkeypatch.setattr(browser.os, "geteuid", lambda: 1000)
    path, why = browser.ensure_chromium()
    assert path is None and "not root" in why
