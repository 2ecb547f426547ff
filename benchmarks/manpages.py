"""A retrieval set from the manual pages installed on this machine (real text nobody here wrote).

Each page gives one (query, document) pair: the query is the short description of its NAME
line ("copy a string", "list directory contents"), the document the start of its DESCRIPTION
section. Pages come from the OS packages (coreutils, the Linux man-pages project's `manpages`
and `manpages-dev`, git, openssl, perl, ...); link pages (`.so`), symbolic links and the
google-cloud-cli pages (16k near-identical templates where that package is installed) are
skipped, so the set is about the same on every Debian machine with the usual packages.

roff is read here with a small converter (fonts, escapes, the common man(7) and mdoc(7)
macros), not rendered with groff: 2,700 pages in ~6 s instead of minutes of subprocesses.
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MAN_ROOT = Path("/usr/share/man")
SECTIONS = "12345678"
SKIP_PREFIXES = ("gcloud",)
MIN_DOC_CHARS = 150
MAX_DOC_CHARS = 1000

_ESCAPES = [
    (r"\\f(\[[^\]]*\]|\(..|.)", ""),  # font changes
    (r"\\s[+-]?\d+", ""),  # size changes
    (r"\\\(em|\\\[em\]", "—"),
    (r"\\\(en|\\\[en\]", "–"),
    (r"\\\(aq|\\\[aq\]|\\\(oq|\\\(cq", "'"),
    (r"\\\(dq|\\\[dq\]|\\\(lq|\\\(rq|\\\[lq\]|\\\[rq\]", '"'),
    (r"\\\(bu|\\\[bu\]", "•"),
    (r"\\\(mu", "×"),
    (r"\\\(..|\\\[[^\]]*\]", ""),  # other named glyphs
    (r"\\\*\(..|\\\*\[[^\]]*\]|\\\*.", ""),  # strings
    (r"\\[nk](\[[^\]]*\]|\(..|.)", ""),  # registers
    (r"\\[hvwlLDxXoZ]'[^']*'", ""),  # motions
    (r'\\".*', ""),  # comments
    (r"\\[&|^%:)]", ""),
    (r"\\-", "-"),
    (r"\\e", "\\\\"),
    (r"\\[ ~]", " "),
    (r"\\c$", ""),
    (r"\\.", ""),
]
_ESCAPES_RX = [(re.compile(a), b) for a, b in _ESCAPES]
_TEXT_MACROS = {"B", "I", "SM", "SB", "R", "OP", "SY"}
_JOINED_MACROS = {"BR", "RB", "IR", "RI", "BI", "IB"}
_MDOC_TEXT = {
    "Nm", "Nd", "Fn", "Fa", "Ar", "Fl", "Xr", "Em", "Sy", "Li", "Pa", "Va", "Dv", "Er", "Ev",
    "Cm", "Ic", "Ql", "Dq", "Sq", "Pq", "Op", "It", "Ft", "Vt", "Tn", "No",
}  # fmt: skip
_MDOC_WORDS = {"Ns", "Ar", "Fl", "Pq", "Op", "Xr", "No", "Li", "Cm", "Ql"}
_ARGS = re.compile(r'"((?:[^"]|"")*)"|(\S+)')
_HEADING = re.compile(r"\.\s*(SH|Sh)\s+(.*)")
_DESCRIPTION = re.compile(r"\s[-—–]+\s+(.*)")


def unescape(text: str) -> str:
    for rx, replacement in _ESCAPES_RX:
        text = rx.sub(replacement, text)
    return text


def _macro_text(line: str) -> str:
    """The text a request line contributes ('' for layout requests)."""
    m = re.match(r"[.']\s*([A-Za-z]+)\s*(.*)", line)
    if not m:
        return ""
    name, rest = m.groups()
    args = [a or b for a, b in _ARGS.findall(rest)]
    if name in _TEXT_MACROS:
        return " ".join(args)
    if name in _JOINED_MACROS:
        return "".join(args)
    if name == "IP":
        return args[0] if args else ""
    if name in _MDOC_TEXT:
        words = " ".join(a for a in args if a not in _MDOC_WORDS)
        return "-" + words if name == "Fl" else words
    return ""


def sections(roff: str) -> dict[str, str]:
    """Section heading -> its text, whitespace collapsed."""
    out: dict[str, list[str]] = {}
    current = None
    for line in roff.splitlines():
        heading = _HEADING.match(line)
        if heading:
            current = unescape(heading.group(2)).strip().strip('"').upper()
            out.setdefault(current, [])
        elif current is not None and not line.startswith(('.\\"', "'\\\"")):
            text = _macro_text(line) if line.startswith((".", "'")) else line
            if text:
                out[current].append(unescape(text))
    return {k: " ".join(" ".join(v).split()) for k, v in out.items()}


@dataclass(frozen=True)
class Page:
    name: str  # file name, e.g. "strcpy.3.gz"
    query: str  # the NAME line's description
    document: str  # the start of DESCRIPTION


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0]


def read_page(path: Path) -> Page | None:
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    roff = data.decode("utf-8", errors="replace")
    if roff.lstrip().startswith(".so"):
        return None
    parts = sections(roff)
    match = _DESCRIPTION.search(parts.get("NAME", ""))
    document = parts.get("DESCRIPTION", "")
    if match is None or len(document) < MIN_DOC_CHARS:
        return None
    query = match.group(1).strip().rstrip(".")
    if len(query) < 8:
        return None
    return Page(path.name, query, _cut(document, MAX_DOC_CHARS))


def iter_pages(root: Path = MAN_ROOT) -> Iterator[Page]:
    """Every usable page, in a fixed order (section, file name)."""
    for section in SECTIONS:
        folder = root / f"man{section}"
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.is_symlink() or not path.is_file() or path.name.startswith(SKIP_PREFIXES):
                continue
            page = read_page(path)
            if page is not None:
                yield page
