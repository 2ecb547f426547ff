"""Text helpers every stage shares: normalization and content ids, folding, word shingles and
Jaccard, copy and repetition measures, the language of a text.

One folding (`folded_text`) serves exact dedup keys, shingles, query dedup and the leakage
report, so "the same text" means the same thing everywhere.
"""

from __future__ import annotations

import collections
import difflib
import functools
import hashlib
import re
import unicodedata
from typing import Any

import polars as pl

_WS = re.compile(r"\s+")
_WORD = re.compile(r"\w+", re.UNICODE)


# --- identity -----------------------------------------------------------------------------------


def normalize_text(text: str) -> str:
    """Unicode NFC, every whitespace run to one space, stripped. Defines passage identity."""
    return _WS.sub(" ", unicodedata.normalize("NFC", text)).strip()


def passage_id(normalized: str) -> str:
    """Stable content id: the same normalized text gets the same id in every run and machine."""
    return hashlib.blake2b(normalized.encode("utf-8"), digest_size=16).hexdigest()


def stable_hash64(key: str) -> int:
    """BLAKE2b of a string as an unsigned 64-bit integer: the same in every process and release
    (Polars' and Python's own hashes are not)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


# --- folding and shingles -----------------------------------------------------------------------


def folded_text(col: str = "text") -> pl.Expr:
    """Case-, width- and punctuation-insensitive form of a text column (the exact-dedup key)."""
    return (
        pl.col(col)
        .str.normalize("NFKC")
        .str.to_lowercase()
        .str.replace_all(r"[\W_]+", " ")
        .str.strip_chars()
    )


def fold_many(texts: list[str]) -> list[str]:
    """`folded_text` for a list of strings (one Polars call: the same folding everywhere)."""
    return (
        pl.DataFrame({"text": texts}, schema={"text": pl.String})
        .select(folded_text())["text"]
        .to_list()
    )


def shingles_of(folded: str, size: int) -> frozenset[str]:
    """Word n-grams of an already folded text; a text shorter than n words is one shingle."""
    words = folded.split()
    if len(words) <= size:
        return frozenset([" ".join(words)]) if words else frozenset()
    return frozenset(" ".join(words[i : i + size]) for i in range(len(words) - size + 1))


def shingle_sets(texts: list[str], size: int) -> list[frozenset[str]]:
    return [shingles_of(f, size) for f in fold_many(texts)]


def shingle_set(text: str, size: int) -> frozenset[str]:
    return shingle_sets([text], size)[0]


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


# --- copies and repetition ----------------------------------------------------------------------


def words(text: str) -> list[str]:
    return _WORD.findall(text.casefold())


def copy_ratio(query: str, passage: str) -> float:
    """Share of the query's words that form one verbatim run of the passage's words."""
    q, p = words(query), words(passage)
    if not q:
        return 0.0
    match = difflib.SequenceMatcher(None, q, p, autojunk=False).find_longest_match(
        0, len(q), 0, len(p)
    )
    return match.size / len(q)


def word_overlap(a: str, b: str) -> float:
    """Multiset Jaccard of the two texts' words: 1.0 for the same words in any order. Catches
    what a contiguous-run or shingle measure misses, such as the positive's sentences reordered."""
    ca, cb = collections.Counter(words(a)), collections.Counter(words(b))
    union = sum((ca | cb).values())
    return sum((ca & cb).values()) / union if union else 1.0


def query_word_share(query: str, passage: str) -> float:
    """Share of the passage's words that are words of the query: near 1.0 for a "passage" that
    repeats the query and adds little ("How to create a new text section ... Summary: 2 min")."""
    q, p = set(words(query)), words(passage)
    return sum(w in q for w in p) / len(p) if p else 1.0


def repeated_trigram_share(text: str) -> float:
    """Share of the word 3-grams of `text` that repeat an earlier one (0 for fewer than 10
    words): a small model stuck in a loop ("the most recent version of the log is the most
    recent version of the log ...") scores high, prose scores near 0. Gopher's quality rules
    use the same signal."""
    ws = words(text)
    if len(ws) < 10:
        return 0.0
    grams = list(zip(ws, ws[1:], ws[2:], strict=False))
    return 1 - len(set(grams)) / len(grams)


# --- language ----------------------------------------------------------------------------------


def dominant_script(text: str) -> str | None:
    """The writing system of most of the letters (LATIN, CYRILLIC, CJK, ARABIC, ...), from the
    Unicode character names; None when the text has no letters."""
    counts: collections.Counter[str] = collections.Counter()
    for ch in text:
        if ch.isalpha():
            counts[unicodedata.name(ch, "UNKNOWN").split(" ")[0]] += 1
    return counts.most_common(1)[0][0] if counts else None


def same_script(text: str, reference: str) -> bool:
    """False when `text` is mostly written in another script than `reference`. This catches a
    small model answering in another language or alphabet; it does not tell English from French
    (a language identifier would be needed for that)."""
    a, b = dominant_script(text), dominant_script(reference)
    return a is None or b is None or a == b


# A reference (passage) whose own language is less certain than this is not compared against.
REFERENCE_LANGUAGE_MIN_PROB = 0.9
LANGUAGE_MIN_WORDS = 3


@functools.cache
def _language_identifier() -> Any:
    """py3langid's model (97 languages, shipped in its wheel), loaded once per process (0.7 s);
    it is read-only, so sharing it between calls is safe."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def language_odds(text: str, reference: str) -> tuple[str, str, float] | None:
    """(text's likeliest language, reference's language, how many times likelier the text is in
    its likeliest language than in the reference's); None when the reference's own language is
    unclear (code, lists of names) or the text has fewer than 3 words."""
    if len(words(text)) < LANGUAGE_MIN_WORDS:
        return None
    identifier = _language_identifier()
    ref_lang, ref_prob = identifier.classify(reference)
    if ref_prob < REFERENCE_LANGUAGE_MIN_PROB:
        return None
    probs = dict(identifier.rank(text))
    top = max(probs, key=probs.__getitem__)
    return top, ref_lang, float(probs[top] / max(probs.get(ref_lang, 0.0), 1e-12))
