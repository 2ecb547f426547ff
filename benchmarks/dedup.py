"""Near-duplicate detection: this project (shingles hashed in Polars, rensa MinHash, LSH bands
in NumPy, exact verification) against datasketch's MinHashLSH (shingles in Python), on the same
shingle sets, num_perm and threshold, side by side.

Corpus: real prose (docstrings of every importable standard-library module), plus planted
near-duplicates of a fifth of it, each made by one of: word edits, a sentence swap, a
truncation. Ground truth: the planted pairs, plus any pair of base passages whose exact shingle
Jaccard reaches the threshold (real near-duplicates such as json.load / json.loads are not
errors). To reach a size worth timing, passages beyond the distinct paragraphs come from a
word-bigram model trained on them. Both methods are timed from texts to pairs, shingling included.

Last line: `dedup speedup_vs_datasketch=R precision=P recall=Q` (this project's P and Q).
Usage: .venv/bin/python benchmarks/dedup.py [N_BASE]
"""

from __future__ import annotations

import random
import re
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from schemas.config import DedupConfig  # noqa: E402
from tasks.minhash import near_duplicate_pairs  # noqa: E402
from tasks.text import fold_many, jaccard, shingle_sets  # noqa: E402

# Modules with side effects on import (printing, a browser, a GUI) stay out.
UNSAFE = {"this", "antigravity", "idlelib", "tkinter", "turtle", "turtledemo", "pydoc_data"}


def _docstrings() -> list[str]:
    """Docstrings of standard-library modules, their classes, functions and methods."""
    import importlib
    import inspect

    docs = []
    for name in sorted(sys.stdlib_module_names - UNSAFE):
        if name.startswith("_"):
            continue
        try:
            module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - platform-specific modules are skipped
            continue
        docs.append(module.__doc__ or "")
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            docs.append(obj.__doc__ or "")
            if inspect.isclass(obj):
                docs += [
                    m.__doc__ or "" for k, m in sorted(vars(obj).items()) if not k.startswith("_")
                ]
    return docs


def base_corpus(limit: int) -> list[str]:
    """Distinct prose paragraphs (>= 150 chars) of standard-library docstrings."""
    seen, out = set(), []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        docs = _docstrings()
    for doc in docs:
        if not isinstance(doc, str):
            continue
        for para in re.split(r"\n\s*\n", doc):
            text = " ".join(para.split())
            if len(text) >= 150 and ">>>" not in text and text not in seen:
                seen.add(text)
                out.append(text)
    return out[:limit]


def expand(paragraphs: list[str], n: int, rng: random.Random) -> list[str]:
    """The distinct paragraphs, then passages from a word-bigram model trained on them (prose-
    like text with the corpus's word frequencies, but no shared passages) up to n."""
    follow: dict[str, list[str]] = {}
    for para in paragraphs:
        words = para.split()
        for a, b in zip(words, words[1:], strict=False):
            follow.setdefault(a, []).append(b)
    starts = [p.split()[0] for p in paragraphs]
    out = list(paragraphs[:n])
    while len(out) < n:
        word, words = rng.choice(starts), []
        for _ in range(rng.randint(40, 160)):
            words.append(word)
            word = rng.choice(follow.get(word) or starts)
        out.append(" ".join(words))
    return out


def plant(text: str, rng: random.Random) -> str:
    words = text.split()
    kind = rng.choice(["edit", "swap", "truncate"])
    if kind == "edit":  # replace ~3% of the words
        for i in rng.sample(range(len(words)), max(1, len(words) // 33)):
            words[i] = rng.choice(["very", "new", "other", "the", "changed", "data"])
        return " ".join(words)
    if kind == "swap":  # swap two sentences
        sentences = re.split(r"(?<=[.!?])\s+", text)
        if len(sentences) >= 2:
            i, j = rng.sample(range(len(sentences)), 2)
            sentences[i], sentences[j] = sentences[j], sentences[i]
            return " ".join(sentences)
        return " ".join(words[1:] + words[:1])
    return " ".join(words[: max(1, int(len(words) * 0.9))])  # drop the last 10%


def ours(texts: list[str], cfg: DedupConfig) -> set[tuple[int, int]]:
    return {(i, j) for i, j, _ in near_duplicate_pairs(fold_many(texts), cfg)}


def datasketch_pairs(texts: list[str], cfg: DedupConfig) -> set[tuple[int, int]]:
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=cfg.near_threshold, num_perm=cfg.num_perm)
    hashes = []
    for i, shingles in enumerate(shingle_sets(texts, cfg.shingle_size)):
        m = MinHash(num_perm=cfg.num_perm, seed=cfg.seed)
        m.update_batch([s.encode() for s in shingles])
        lsh.insert(i, m)
        hashes.append(m)
    return {(min(i, j), max(i, j)) for i, m in enumerate(hashes) for j in lsh.query(m) if j != i}


def main() -> None:
    n_base = int(sys.argv[1]) if len(sys.argv) > 1 else 16000
    rng = random.Random(0)
    texts = expand(base_corpus(n_base), n_base, rng)
    n = len(texts)
    planted = set()
    for i in rng.sample(range(n), n // 5):
        planted.add((i, len(texts)))
        texts.append(plant(texts[i], rng))
    cfg = DedupConfig()
    print(f"corpus: {n} base passages + {len(planted)} planted near-duplicates = {len(texts)} rows")

    start = time.perf_counter()
    found = ours(texts, cfg)
    t_ours = time.perf_counter() - start
    start = time.perf_counter()
    found_ds = datasketch_pairs(texts, cfg)
    t_ds = time.perf_counter() - start

    # Real near-duplicates among base passages count as true pairs (checked exactly).
    shingles = shingle_sets(texts, cfg.shingle_size)
    real = {
        p
        for p in (found | found_ds) - planted
        if jaccard(shingles[p[0]], shingles[p[1]]) >= cfg.near_threshold
    }
    truth = planted | real
    # Recall is over the planted pairs (those an edit pushed below the threshold count as
    # misses); precision is over everything reported, against planted + verified real pairs.
    p_ours, r_ours = len(found & truth) / max(len(found), 1), len(found & planted) / len(planted)
    p_ds, r_ds = (
        len(found_ds & truth) / max(len(found_ds), 1),
        len(found_ds & planted) / len(planted),
    )
    below = sum(jaccard(shingles[i], shingles[j]) < cfg.near_threshold for i, j in planted)
    print(
        f"ground truth: {len(planted)} planted + {len(real)} real pairs "
        f"({below} planted pairs have Jaccard < {cfg.near_threshold})"
    )
    print(
        f"settings: word {cfg.shingle_size}-shingles, num_perm={cfg.num_perm}, "
        f"bands={cfg.num_bands}, threshold={cfg.near_threshold}"
    )
    print(
        f"tripletforge (rensa + verify): {t_ours:6.2f} s  {len(texts) / t_ours:9.0f} rows/s  "
        f"pairs={len(found)} precision={p_ours:.3f} recall={r_ours:.3f}"
    )
    print(
        f"datasketch MinHashLSH:         {t_ds:6.2f} s  {len(texts) / t_ds:9.0f} rows/s  "
        f"pairs={len(found_ds)} precision={p_ds:.3f} recall={r_ds:.3f}"
    )
    speedup = t_ds / t_ours
    print(f"dedup speedup_vs_datasketch={speedup:.1f} precision={p_ours:.3f} recall={r_ours:.3f}")


if __name__ == "__main__":
    main()
