"""Small builders shared by the tests."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from schemas.tables import PASSAGES
from tasks.text import normalize_text, passage_id

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample" / "passages.jsonl"


def passages(texts: list[str]) -> pa.Table:
    """A passages table as ingest would make it from these texts."""
    rows = [
        {
            "passage_id": passage_id(normalize_text(t)),
            "text": normalize_text(t),
            "title": None,
            "source": "f",
            "row": i,
            "source_id": None,
            "metadata": None,
        }
        for i, t in enumerate(texts)
    ]
    return pa.Table.from_pylist(rows, schema=PASSAGES)


def sample_rows(n: int) -> list[dict]:
    """The first n rows of the bundled sample corpus."""
    with SAMPLE.open() as f:
        return [json.loads(line) for _, line in zip(range(n), f, strict=False)]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
