"""Build the bundled sample corpus from the documentation strings of Python's standard library.

The text is real technical prose under the Python Software Foundation License (permissive), and
it is already installed wherever Python is. The committed `data/sample/passages.jsonl` was made by
`python -m tasks.sample_corpus data/sample/passages.jsonl`; docstrings differ a little between
Python versions, which is why the file is committed rather than rebuilt at set-up.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

MODULES = (
    "json",
    "csv",
    "os",
    "os.path",
    "shutil",
    "pathlib",
    "re",
    "string",
    "textwrap",
    "datetime",
    "calendar",
    "collections",
    "heapq",
    "bisect",
    "itertools",
    "functools",
    "operator",
    "math",
    "statistics",
    "random",
    "fractions",
    "decimal",
    "hashlib",
    "hmac",
    "secrets",
    "base64",
    "binascii",
    "zlib",
    "gzip",
    "bz2",
    "lzma",
    "zipfile",
    "tarfile",
    "sqlite3",
    "pickle",
    "copy",
    "pprint",
    "enum",
    "dataclasses",
    "typing",
    "abc",
    "contextlib",
    "logging",
    "argparse",
    "getopt",
    "tempfile",
    "glob",
    "fnmatch",
    "filecmp",
    "subprocess",
    "threading",
    "queue",
    "sched",
    "socket",
    "ssl",
    "select",
    "selectors",
    "asyncio",
    "urllib.parse",
    "urllib.request",
    "http.client",
    "http.server",
    "email.message",
    "smtplib",
    "uuid",
    "ipaddress",
    "html",
    "xml.etree.ElementTree",
    "unittest",
    "doctest",
    "timeit",
    "traceback",
    "warnings",
    "inspect",
    "ast",
    "dis",
    "tokenize",
    "io",
    "struct",
    "codecs",
    "unicodedata",
    "locale",
    "gettext",
    "difflib",
    "array",
    "weakref",
    "types",
    "graphlib",
    "configparser",
    "tomllib",
    "plistlib",
    "mimetypes",
    "shlex",
    "signal",
    "mmap",
    "platform",
    "sysconfig",
    "zoneinfo",
    "time",
)

_WS = re.compile(r"\s+")


def _paragraphs(doc: str) -> list[str]:
    return [_WS.sub(" ", p).strip() for p in re.split(r"\n\s*\n", inspect.cleandoc(doc))]


def _looks_like_prose(text: str) -> bool:
    # Skip signatures, doctest blocks and tables: keep sentences.
    return (
        ">>>" not in text
        and text.count("|") < 3
        and sum(c.isalpha() or c == " " for c in text) / max(len(text), 1) > 0.8
    )


def passage_from_doc(doc: str, min_chars: int, max_chars: int) -> str | None:
    """First paragraphs of a docstring joined up to `max_chars`, or None if too little prose."""
    out: list[str] = []
    size = 0
    for para in _paragraphs(doc):
        if not _looks_like_prose(para):
            if out:
                break
            continue
        if size + len(para) > max_chars:
            break
        out.append(para)
        size += len(para) + 1
    text = " ".join(out)
    return text if len(text) >= min_chars else None


def iter_docstrings(modules: tuple[str, ...] = MODULES) -> Iterator[tuple[str, str]]:
    """(qualified name, docstring) for each module and its public classes and functions."""
    for name in modules:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except ImportError:
            continue
        if module.__doc__:
            yield name, module.__doc__
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            members = sorted(vars(module).items())
        for attr, obj in members:
            if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and obj.__doc__:
                yield f"{name}.{attr}", obj.__doc__


def build(
    limit: int = 400, min_chars: int = 200, max_chars: int = 900, per_module: int = 5
) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    taken: dict[str, int] = {}
    for title, doc in iter_docstrings():
        module = title.split(".")[0]
        text = passage_from_doc(doc, min_chars, max_chars)
        if text is None or text in seen or taken.get(module, 0) >= per_module:
            continue
        seen.add(text)
        taken[module] = taken.get(module, 0) + 1
        rows.append({"title": title, "text": text, "license": "PSF-2.0"})
        if len(rows) >= limit:
            break
    return rows


def main(argv: list[str]) -> None:
    out = Path(argv[1] if len(argv) > 1 else "data/sample/passages.jsonl")
    limit = int(argv[2]) if len(argv) > 2 else 400
    rows = build(limit=limit)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{len(rows)} passages -> {out} (Python {sys.version.split()[0]})")


if __name__ == "__main__":
    main(sys.argv)
