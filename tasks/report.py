"""A run report: DuckDB queries over the run folder, matplotlib plots, one self-contained HTML.

What it shows, top to bottom: the funnel of rows through the stages (manifest.json), duplicate
cluster sizes (clusters), query length by style (queries), candidate scores, filter reasons,
negative grades and judge verdicts (candidates, triplets), rejects, and a fixed sample of
triplets with, for every negative, where it came from and why it was kept.

Every plot is a `<figure id="fig-NAME">` whose `<img>` has an id and an alt text that states
the numbers it draws; the images are embedded as data: URIs and also written beside the page as
NAME.png.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from tasks.io import write_bytes_atomic
from tasks.query import connect

SAMPLE_SIZE = 20  # triplets in the sample table
COUNTS = ("rows_in", "rows_out", "rejected", "deduplicated")

SCORE_SQL = """
SELECT 'positive' AS kind, positive_score AS score FROM triplets
UNION ALL
SELECT CASE WHEN kept THEN 'kept negative' ELSE 'removed: ' || reason END, score
FROM candidates WHERE reason IS DISTINCT FROM 'is_positive'
  AND reason IS DISTINCT FROM 'beyond_num_negatives'
"""
REASON_SQL = """
SELECT coalesce(reason, 'kept') AS reason, count(*) AS n FROM candidates GROUP BY 1 ORDER BY 2 DESC
"""
REJECT_SQL = """
SELECT stage || ': ' || reason AS reason, count(*) AS n FROM rejects GROUP BY 1 ORDER BY 2 DESC
"""
VERDICT_SQL = """
SELECT verdict || ' (grade ' || coalesce(CAST(grade AS VARCHAR), '?') || ')' AS verdict, count(*)
FROM candidates WHERE verdict IS NOT NULL GROUP BY 1 ORDER BY 2 DESC
"""
STYLE_SQL = """
SELECT style, count(*) AS n FROM queries GROUP BY 1 ORDER BY 2 DESC
"""
GRADE_SQL = """
SELECT coalesce(CAST(n.grade AS VARCHAR), 'ungraded') AS grade, n.origin, count(*) AS n
FROM (SELECT unnest(negatives) AS n FROM triplets) GROUP BY ALL ORDER BY 1, 2
"""
# (cluster size, the member kinds it holds, number of clusters)
CLUSTER_SIZE_SQL = """
SELECT size, kinds, count(*) AS clusters FROM (
  SELECT cluster_id, count(*) AS size, string_agg(DISTINCT kind, ' + ' ORDER BY kind) AS kinds
  FROM clusters GROUP BY cluster_id
) GROUP BY ALL ORDER BY size, kinds
"""
UNCLUSTERED_SQL = """
SELECT count(*) FROM passages p ANTI JOIN clusters c ON p.passage_id = c.passage_id
"""
# (style, words in the query, number of queries): aggregated in SQL, so the page costs the
# same for a million queries as for ten
QUERY_LENGTH_SQL = """
SELECT style, len(regexp_split_to_array(trim(query), '\\s+')) AS words, count(*) AS n
FROM {table} WHERE trim(query) <> '' GROUP BY ALL ORDER BY style, words
"""
# The sample: the first triplets by query_id (a hash, so a spread of the data, and the same
# rows every time), one row per negative, with what the candidates table says about it.
SAMPLE_SQL = f"""
WITH t AS (SELECT * FROM triplets ORDER BY query_id LIMIT {SAMPLE_SIZE}),
n AS (
  SELECT t.query_id, t.query, t.style, t.split, t.positive, t.positive_score,
         generate_subscripts(t.negatives, 1) AS i, unnest(t.negatives) AS neg
  FROM t
)
SELECT n.query_id, n.query, n.style, n.split, left(n.positive, 200), n.positive_score, n.i,
       n.neg.origin, n.neg.grade, n.neg.score, left(n.neg.text, 200),
       c.rank, c.cluster_similarity, c.verdict, c.judge_reason, c.kept, c.reason,
       c.query_id IS NOT NULL AS known
FROM n LEFT JOIN (
  SELECT * FROM candidates WHERE query_id IN (SELECT query_id FROM t)
  QUALIFY row_number() OVER (PARTITION BY query_id, passage_id ORDER BY kept DESC) = 1
) c ON c.query_id = n.query_id AND c.passage_id = n.neg.id
ORDER BY n.query_id, n.i
"""
STYLE = (
    "body{font-family:sans-serif;max-width:64em;margin:2em auto;padding:0 1em}"
    "td,th{border:1px solid #ccc;padding:.2em .5em;font-size:.85em;vertical-align:top}"
    "table{border-collapse:collapse}td.num{text-align:right;font-variant-numeric:tabular-nums}"
    "figure{margin:1em 0}figcaption{font-size:.9em;color:#444}img{max-width:100%}"
    "tr.first td{border-top:2px solid #888}td.why{min-width:12em}"
)
COLORS = {"rows_out": "#4c72b0", "rejected": "#c44e52", "deduplicated": "#dd8452"}


@dataclass
class Figure:
    name: str  # file stem and id suffix
    title: str
    png: bytes
    alt: str  # what the figure shows, with its numbers, for a reader who cannot see it
    caption: str = ""

    def html(self) -> str:
        data = base64.b64encode(self.png).decode()
        caption = html.escape(self.caption or self.title)
        return (
            f'<figure id="fig-{self.name}"><img id="img-{self.name}" '
            f'src="data:image/png;base64,{data}" alt="{html.escape(self.alt, quote=True)}">'
            f"<figcaption>{caption}</figcaption></figure>"
        )


def _figure_png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _done(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    png = _figure_png(fig)
    plt.close(fig)
    return png


def _summary(rows: list[tuple[str, int]], limit: int = 8) -> str:
    shown = "; ".join(f"{label}: {n}" for label, n in rows[:limit])
    return shown + (f"; and {len(rows) - limit} more" if len(rows) > limit else "")


def _bar(rows: list[tuple[str, int]], title: str) -> bytes:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 0.4 * max(len(rows), 2) + 1))
    labels = [r[0] for r in rows][::-1]
    ax.barh(labels, [r[1] for r in rows][::-1], color="#4c72b0")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    ax.set_xlabel("count")
    return _done(fig)


def _bar_figure(name: str, rows: list[tuple[str, int]], title: str) -> Figure:
    return Figure(name, title, _bar(rows, title), f"Bar chart, {title}. {_summary(rows)}.")


def _score_hist(rows: list[tuple[str, float]]) -> bytes:
    import matplotlib.pyplot as plt

    groups = _score_groups(rows)
    fig, ax = plt.subplots(figsize=(7, 4))
    for kind in groups:
        ax.hist(
            groups[kind],
            bins=30,
            range=(-0.2, 1.0),
            alpha=0.55,
            label=f"{kind} ({len(groups[kind])})",
        )
    ax.set_title("query similarity: positives, kept negatives, removed candidates")
    ax.set_xlabel("cosine similarity to the query")
    ax.set_ylabel("count")
    ax.legend(fontsize=8)
    return _done(fig)


def _score_groups(rows: list[tuple[str, float]]) -> dict[str, list[float]]:
    groups: dict[str, list[float]] = {}
    for kind, score in rows:
        groups.setdefault(kind, []).append(score)
    order = sorted(groups, key=lambda k: (k != "positive", k != "kept negative", k))
    return {k: groups[k] for k in order}


def _score_figure(rows: list[tuple[str, float]]) -> Figure:
    groups = _score_groups(rows)
    parts = [f"{kind}: {len(v)}, median {sorted(v)[len(v) // 2]:.2f}" for kind, v in groups.items()]
    return Figure(
        "scores",
        "query similarity: positives, kept negatives, removed candidates",
        _score_hist(rows),
        "Histogram of cosine similarity to the query. " + "; ".join(parts) + ".",
    )


def funnel_rows(manifest: dict[str, Any]) -> list[tuple[str, int, int, int, int, float]]:
    """(stage, rows_in, rows_out, rejected, deduplicated, seconds) in pipeline order."""
    return [
        (name, *(int(c[k]) for k in COUNTS), round(float(c.get("seconds", 0.0)), 1))
        for name, c in manifest["stages"].items()
    ]


def _funnel_figure(rows: list[tuple[str, int, int, int, int, float]]) -> Figure:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.45 * max(len(rows), 2) + 1.2))
    names = [r[0] for r in rows][::-1]  # the first stage on top
    left = [0] * len(rows)
    for key, column in (("rows_out", 2), ("rejected", 3), ("deduplicated", 4)):
        values = [r[column] for r in rows][::-1]
        ax.barh(names, values, left=left, color=COLORS[key], label=key.replace("_", " "))
        left = [a + b for a, b in zip(left, values, strict=True)]
    top = max(left or [1]) or 1
    for y, (total, row) in enumerate(zip(left, rows[::-1], strict=True)):
        ax.text(total + top * 0.01, y, f"{row[1]} → {row[2]}", va="center", fontsize=8)
    ax.set_xlim(0, top * 1.18)
    ax.set_title("rows through the stages (in = out + rejected + deduplicated)")
    ax.set_xlabel("rows (a stage's own unit: passages, queries, ...)")
    ax.legend(fontsize=8, loc="lower right")
    alt = "Stacked bar chart, rows through the stages in pipeline order. " + "; ".join(
        f"{s}: {i} in, {o} out, {r} rejected, {d} deduplicated" for s, i, o, r, d, _ in rows
    )
    return Figure(
        "funnel",
        "rows through the stages",
        _done(fig),
        alt + ".",
        "rows through the stages, in pipeline order: each bar is the stage's rows in, split into "
        "rows out, rejected and deduplicated",
    )


def _cluster_figure(rows: list[tuple[int, str, int]], unclustered: int | None) -> Figure:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    sizes = sorted({r[0] for r in rows})
    kinds = sorted({r[1] for r in rows})
    counts = {(size, kind): n for size, kind, n in rows}
    fig, ax = plt.subplots(figsize=(7, 3.5))
    bottom = [0] * len(sizes)
    positions = list(range(len(sizes)))
    for kind in kinds:
        values = [counts.get((s, kind), 0) for s in sizes]
        ax.bar(positions, values, bottom=bottom, width=0.6, label=kind)
        bottom = [a + b for a, b in zip(bottom, values, strict=True)]
    ax.set_xticks(positions, [str(s) for s in sizes])
    ax.set_xlim(-0.75, len(sizes) - 0.25)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("duplicate clusters by size")
    ax.set_xlabel("passages in the cluster")
    ax.set_ylabel("clusters")
    ax.legend(title="member kinds", fontsize=8)
    total = sum(n for _, _, n in rows)
    members = sum(size * n for size, _, n in rows)
    per_size = [(f"size {s}", sum(counts.get((s, k), 0) for k in kinds)) for s in sizes]
    caption = f"{total} clusters holding {members} passages"
    if unclustered is not None:
        caption += f"; {unclustered} passages of the corpus are in no cluster (size 1)"
    return Figure(
        "cluster_sizes",
        "duplicate clusters by size",
        _done(fig),
        f"Bar chart, duplicate clusters by size: {caption}. {_summary(per_size)}.",
        caption,
    )


def _query_length_figure(rows: list[tuple[str, int, int]], table: str) -> Figure:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    styles: dict[str, dict[int, int]] = {}
    for style, words, n in rows:
        styles.setdefault(style, {})[words] = n
    longest = max(r[1] for r in rows)
    bins = [b - 0.5 for b in range(1, longest + 2)]  # one bar per word count, centred on it
    fig, ax = plt.subplots(figsize=(7, 3.5))
    parts = []
    for style, hist in sorted(styles.items(), key=lambda kv: -sum(kv[1].values())):
        total = sum(hist.values())
        med = _weighted_median(hist)
        label = f"{style} ({total}, median {med} words)"
        parts.append(f"{style}: {total} queries, median {med} words, longest {max(hist)}")
        ax.hist(
            list(hist),
            bins=bins,
            weights=list(hist.values()),
            histtype="bar" if len(styles) == 1 else "step",
            linewidth=1.5,
            label=label,
        )
    ax.set_title("query length by style")
    ax.set_xlim(0, longest + 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("words in the query")
    ax.set_ylabel("queries")
    ax.legend(fontsize=8)
    only = f" (one style: {next(iter(styles))})" if len(styles) == 1 else ""
    return Figure(
        "query_length",
        "query length by style",
        _done(fig),
        "Histogram of query length in words, by style. " + "; ".join(parts) + ".",
        f"query length in words, by style{only}; "
        + (
            "every query of the queries table, before query dedup and mining drop any"
            if table == "queries"
            else "the queries of the triplets"
        ),
    )


def _weighted_median(hist: dict[int, int]) -> int:
    half, seen = (sum(hist.values()) + 1) // 2, 0
    for value in sorted(hist):
        seen += hist[value]
        if seen >= half:
            return value
    return 0


def kept_because(
    origin: str | None,
    grade: int | None,
    rank: int | None,
    cluster_similarity: float | None,
    verdict: str | None,
    judge_reason: str | None,
    kept: bool | None,
    reason: str | None,
    known: bool,
) -> str:
    """Why a negative is in its triplet, from its candidates row (a kept candidate has no
    `reason`: it passed every rule; what is said is what let it through)."""
    if not known:
        return "no candidates row"
    if not kept:
        return f"not kept in candidates: {reason}"
    parts = ["passed every filter"]
    if origin == "generated":
        parts.append(f"written by the LLM at grade {grade}")
    elif rank is not None:
        parts.append(f"mined, rank {rank} among the eligible (0 = the hardest)")
    if cluster_similarity is not None:
        parts.append(f"a sibling of the positive (Jaccard {cluster_similarity:.2f})")
    if verdict:
        parts.append(f"judge: {verdict}" + (f": {judge_reason}" if judge_reason else ""))
    return "; ".join(parts)


def _number(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _sample_table(rows: list[tuple]) -> str:
    """One row per negative; the query and its positive span the rows of their negatives."""
    head = "".join(
        f"<th>{c}</th>"
        for c in (
            "query (style, split)",
            "positive (score)",
            "#",
            "origin",
            "grade",
            "score",
            "negative",
            "why kept",
        )
    )
    spans: dict[str, int] = {}
    for row in rows:
        spans[row[0]] = spans.get(row[0], 0) + 1
    body, seen = [], set()
    for row in rows:
        (qid, query, style, split, positive, pscore, i, origin, grade, score, text) = row[:11]
        cells = []
        first = qid not in seen
        if first:
            seen.add(qid)
            span = spans[qid]
            cells.append(
                f'<td rowspan="{span}">{html.escape(query)}<br><small>{html.escape(style)}, '
                f"{html.escape(split)}</small></td>"
                f'<td rowspan="{span}">{html.escape(positive)} '
                f"<small>({_number(pscore)})</small></td>"
            )
        why = kept_because(origin, grade, *row[11:])
        cells.append(
            f'<td class="num">{i}</td><td>{html.escape(str(origin))}</td>'
            f'<td class="num">{_number(grade)}</td><td class="num">{_number(score)}</td>'
            f'<td>{html.escape(text or "")}</td><td class="why">{html.escape(why)}</td>'
        )
        attrs = f' class="first" data-query-id="{html.escape(qid)}"' if first else ""
        body.append(f"<tr{attrs}>{''.join(cells)}</tr>")
    return f'<table id="sample-table"><tr>{head}</tr>{"".join(body)}</table>'


def _funnel_table(rows: list[tuple[str, int, int, int, int, float]]) -> str:
    head = "".join(
        f"<th>{c}</th>" for c in ("stage", "in", "out", "rejected", "deduplicated", "seconds")
    )
    body = "".join(
        f'<tr data-stage="{html.escape(name)}"><td>{html.escape(name)}</td>'
        + "".join(
            f'<td class="num" data-count="{key}">{value}</td>'
            for key, value in zip(COUNTS, counts, strict=True)
        )
        + f'<td class="num">{seconds}</td></tr>'
        for name, *counts, seconds in rows
    )
    return f'<table id="funnel-table"><tr>{head}</tr>{body}</table>'


def _section(key: str, title: str, *parts: str) -> str:
    return f'<section id="{key}"><h2>{html.escape(title)}</h2>{"".join(parts)}</section>'


def _note(text: str) -> str:
    return f"<p>{html.escape(text)}</p>"


def _figures(con: duckdb.DuckDBPyConnection, views: set[str]) -> dict[str, list[Figure]]:
    """The plots per section, each only where the run has the tables it needs."""
    sections: dict[str, list[Figure]] = {"clusters": [], "queries": [], "negatives": []}
    if "clusters" in views:
        sizes = con.execute(CLUSTER_SIZE_SQL).fetchall()
        if sizes:
            unclustered = (
                con.execute(UNCLUSTERED_SQL).fetchone()[0] if "passages" in views else None
            )
            sections["clusters"].append(_cluster_figure(sizes, unclustered))
    table = "queries" if "queries" in views else "triplets" if "triplets" in views else None
    if table:
        lengths = con.execute(QUERY_LENGTH_SQL.format(table=table)).fetchall()
        if lengths:
            sections["queries"].append(_query_length_figure(lengths, table))
    if "queries" in views:
        sections["queries"].append(
            _bar_figure("query_styles", con.execute(STYLE_SQL).fetchall(), "queries by style")
        )
    if {"triplets", "candidates"} <= views:
        negatives = sections["negatives"]
        negatives.append(_score_figure(con.execute(SCORE_SQL).fetchall()))
        negatives.append(
            _bar_figure(
                "candidate_reasons",
                con.execute(REASON_SQL).fetchall(),
                "mined candidates: kept, or the filter that removed them",
            )
        )
        grades = con.execute(GRADE_SQL).fetchall()
        negatives.append(
            _bar_figure(
                "grades",
                [(f"grade {g} / {o}", n) for g, o, n in grades],
                "negatives by grade and origin",
            )
        )
        verdicts = con.execute(VERDICT_SQL).fetchall()
        if verdicts:
            negatives.append(
                _bar_figure("judge_verdicts", verdicts, "LLM judge verdicts on mined negatives")
            )
    rejects = con.execute(REJECT_SQL).fetchall() if "rejects" in views else []
    sections["rejects"] = (
        [_bar_figure("rejects", rejects, "rejected rows by stage and reason")] if rejects else []
    )
    return sections


def build_report(run_dir: str | Path) -> Path:
    """Write `report/report.html` (plots embedded) and the PNGs beside it; returns the HTML path."""
    import matplotlib

    matplotlib.use("Agg")
    run_dir = Path(run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    funnel = funnel_rows(manifest)
    con = connect(run_dir)
    try:
        views = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views()").fetchall()}
        sections = _figures(con, views)
        sample = con.execute(SAMPLE_SQL).fetchall() if {"triplets", "candidates"} <= views else []
    finally:
        con.close()
    sections = {"funnel": [_funnel_figure(funnel)] if funnel else [], **sections}
    figures = [f for group in sections.values() for f in group]

    out = run_dir / "report"
    names = {f"{f.name}.png" for f in figures}
    for stale in out.glob("*.png"):  # plots an earlier report of this run drew and this one not
        if stale.name not in names:
            stale.unlink()
    for f in figures:
        write_bytes_atomic(out / f"{f.name}.png", f.png)

    def shown(key: str, empty: str) -> str:
        return "".join(f.html() for f in sections[key]) or _note(empty)

    run_id = html.escape(manifest["run_id"])
    triplets_shown = len({row[0] for row in sample})
    page = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>tripletforge run {run_id}</title><style>{STYLE}</style></head><body>"
        f"<h1>run {run_id}</h1>"
        f"<p>config hash {html.escape(manifest['config_hash'][:12])}, "
        f"mode {html.escape(str(manifest['config'].get('input', {}).get('mode', '?')))}, "
        f"created {html.escape(manifest['created_at'])}, "
        f"total {manifest['timings']['total']:.1f} s</p>"
        + _section("funnel", "funnel", shown("funnel", "no stages ran"), _funnel_table(funnel))
        + _section("clusters", "duplicate clusters", shown("clusters", "no duplicate clusters"))
        + _section("queries", "queries", shown("queries", "no queries"))
        + _section("negatives", "negatives", shown("negatives", "no candidates"))
        + _section("rejects", "rejects", shown("rejects", "no rejected rows"))
        + _section(
            "sample",
            f"sample of triplets ({triplets_shown}, the first by query_id)",
            _note(
                "origin: mined = a corpus passage found by search, generated = written by the "
                "LLM at a relevance grade (0 irrelevant .. 3 fully relevant; – ungraded); "
                "score: cosine similarity to the query."
            ),
            _sample_table(sample) if sample else _note("no triplets"),
        )
        + "</body></html>"
    )
    write_bytes_atomic(out / "report.html", page.encode("utf-8"))
    return out / "report.html"
