"""A run report: DuckDB queries over the run folder, matplotlib plots, one self-contained HTML."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from tasks.io import write_bytes_atomic
from tasks.query import connect

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
STYLE = (
    "body{font-family:sans-serif;max-width:60em;margin:2em auto}"
    "td,th{border:1px solid #ccc;padding:.2em .5em;font-size:.9em}table{border-collapse:collapse}"
)
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


def _figure_png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _bar(rows: list[tuple[str, int]], title: str) -> bytes:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.4 * max(len(rows), 2) + 1))
    labels = [r[0] for r in rows][::-1]
    ax.barh(labels, [r[1] for r in rows][::-1], color="#4c72b0")
    ax.set_title(title)
    ax.set_xlabel("count")
    png = _figure_png(fig)
    plt.close(fig)
    return png


def _score_hist(rows: list[tuple[str, float]]) -> bytes:
    import matplotlib.pyplot as plt

    groups: dict[str, list[float]] = {}
    for kind, score in rows:
        groups.setdefault(kind, []).append(score)
    fig, ax = plt.subplots(figsize=(7, 4))
    for kind in sorted(groups, key=lambda k: (k != "positive", k != "kept negative", k)):
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
    png = _figure_png(fig)
    plt.close(fig)
    return png


def _table(columns: list[str], rows: list[tuple]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def build_report(run_dir: str | Path) -> Path:
    """Write `report/report.html` (plots embedded) and the PNGs beside it; returns the HTML path."""
    import matplotlib

    matplotlib.use("Agg")
    run_dir = Path(run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    con = connect(run_dir)
    try:
        views = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views()").fetchall()}
        plots: dict[str, bytes] = {}
        if {"triplets", "candidates"} <= views:
            plots["scores"] = _score_hist(con.execute(SCORE_SQL).fetchall())
            plots["candidate_reasons"] = _bar(
                con.execute(REASON_SQL).fetchall(),
                "mined candidates: kept, or the filter that removed them",
            )
            grades = con.execute(GRADE_SQL).fetchall()
            plots["grades"] = _bar(
                [(f"grade {g} / {o}", n) for g, o, n in grades], "negatives by grade and origin"
            )
            verdicts = con.execute(VERDICT_SQL).fetchall()
            if verdicts:
                plots["judge_verdicts"] = _bar(verdicts, "LLM judge verdicts on mined negatives")
        if "queries" in views:
            plots["query_styles"] = _bar(con.execute(STYLE_SQL).fetchall(), "queries by style")
        rejects = con.execute(REJECT_SQL).fetchall() if "rejects" in views else []
        if rejects:
            plots["rejects"] = _bar(rejects, "rejected rows by stage and reason")
        examples = (
            con.execute(
                "SELECT query, left(positive, 160), left(negatives[1].text, 160), "
                "round(positive_score, 3), round(negatives[1].score, 3) FROM triplets "
                "ORDER BY query_id LIMIT 8"
            ).fetchall()
            if "triplets" in views
            else []
        )
    finally:
        con.close()

    out = run_dir / "report"
    for name, png in plots.items():
        write_bytes_atomic(out / f"{name}.png", png)
    stage_rows = [
        (
            name,
            c["rows_in"],
            c["rows_out"],
            c["rejected"],
            c["deduplicated"],
            round(c["seconds"], 1),
        )
        for name, c in manifest["stages"].items()
    ]
    images = "".join(
        f"<h3>{html.escape(name)}</h3>"
        f'<img src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        for name, png in plots.items()
    )
    run_id = html.escape(manifest["run_id"])
    stage_table = _table(["stage", "in", "out", "rejected", "deduplicated", "seconds"], stage_rows)
    example_table = _table(
        ["query", "positive", "hardest negative", "positive score", "negative score"], examples
    )
    page = (
        f'<!doctype html><html><head><meta charset="utf-8"><title>tripletforge run {run_id}'
        f"</title><style>{STYLE}</style></head><body><h1>run {run_id}</h1>"
        f"<p>config hash {html.escape(manifest['config_hash'][:12])}, "
        f"created {html.escape(manifest['created_at'])}, "
        f"total {manifest['timings']['total']:.1f} s</p>"
        f"<h2>stages</h2>{stage_table}<h2>plots</h2>{images}"
        f"<h2>examples</h2>{example_table}</body></html>"
    )
    write_bytes_atomic(out / "report.html", page.encode("utf-8"))
    return out / "report.html"
