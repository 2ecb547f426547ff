"""Does this pipeline make better training data than sentence-transformers' `mine_hard_negatives`?

Train and evaluate, side by side in one run, on real text nobody here wrote: the manual pages of
this machine's OS packages (benchmarks/manpages.py). A page's NAME description is the query
("copy a string"), the start of its DESCRIPTION the document. Pages are split into train and
eval by connected components of (query text, near-duplicate document cluster), so no query text
and no near-copy of a document is on both sides; about a thousand eval queries.

Every method gets the same training pairs and the same mining corpus, and produces negatives for
them. The mining corpus is chunked as real corpora are: the training documents (each page's first
chunk, the positive) and the further chunks of the same pages' DESCRIPTION. A later chunk of the
positive's own page often answers the query too: the false negative a real corpus has.

- `random`: three random passages of the mining corpus per query;
- `st_mined`: `mine_hard_negatives` with its defaults (3 hardest, no filter);
- `st_margin`: `mine_hard_negatives(relative_margin=0.05)` (NV-Retriever's 95% rule);
- `tripletforge`: this pipeline in pairs mode with its defaults (`tripletforge run` on the
  pairs, Prefect + Ray, split.eval_fraction 0), told which page each chunk is from
  (`input.document_column`); its FlagEmbedding export is what is trained on;
- `tf_simans`: the same with `mining.sampling_strategy: simans`;
- `tf_written`: the same with passages written by the bundled LLM at grade 1 ("same topic,
  does not answer") for the first `--written` queries, through the same false-negative gate;
- only with `--only`: `tf_no_document`, the same without `input.document_column` (what the
  page column buys), and `tf_nv95`, the defaults before this benchmark tuned them
  (`max_positive_ratio` 0.95, NV-Retriever's rule, and 4 negatives; now 1.3 and 3).

Then, for each method and seed, all-MiniLM-L6-v2 is fine-tuned for the same number of steps
(one pass over the training pairs at batch 32) with sentence-transformers'
MultipleNegativesRankingLoss on (query, positive, negative 1, 2, 3) n-tuples, the way
sentence-transformers trains on `mine_hard_negatives`' n-tuple output: every step sees all three
of each query's negatives (a query with fewer repeats them, one with more, e.g. written passages
on top of mined ones, gets a seeded sample of three) and the other queries' passages as in-batch
negatives; a method that drops a query trains on what it kept. Word embeddings and the
lower 3 of the 6 layers are frozen, their output computed once per text (no dropout there), and
texts cut at 64 tokens (350 characters) to fit a 2-core CPU. nDCG@10 of
the eval queries against the evaluation corpus (every page's first chunk, train and eval) is
reported per seed, with the untuned model as `base`; a tuned model's evaluation also reads the
frozen layers' output from that cache (checked against the untuned model's plain encoding).

`--format triplet` trains instead on (query, positive, negative) rows, one per negative, which is
what `mine_hard_negatives` outputs by default, for one pass over them (3 rows per pair: 156
steps, batches without a repeated text as sentence-transformers' NoDuplicatesBatchSampler makes
them): three times the updates, ~125 s a training on 2 cores, so the whole benchmark would take
over 30 minutes; it is the check that an ordering does not hang on the training length.

Data checks beside it, on the base model's scores: the share of negatives that are a near copy
of their positive (shingle Jaccard >= 0.9), from the positive's own page, and scoring above
their positive.

Beside the table, each method's nDCG@10 minus `st_mined`'s on the same seed (a seed fixes the
torch seed and the shuffling for every method): whether a method is ahead on every seed or only
on average.
Last line: `quality base=B random=R st_mined=S tripletforge=T` (means over seeds).
Usage: .venv/bin/python benchmarks/quality.py [--seeds 0,1] [--written 128] [--only a,b]
       [--format n-tuple|triplet] [--variant NAME:section.key=value,...]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
import yaml  # noqa: E402
from manpages import iter_pages  # noqa: E402

from schemas.config import DedupConfig  # noqa: E402
from tasks.hardware import cpu_description  # noqa: E402
from tasks.minhash import components, near_duplicate_pairs  # noqa: E402
from tasks.models import minilm_path  # noqa: E402
from tasks.text import fold_many, jaccard, shingle_sets  # noqa: E402

if TYPE_CHECKING:
    import torch

WORK = ROOT / ".cache" / "quality"
DOC_CHARS = 350  # ~64 tokens: one chunk, what the trainer and the evaluation see
MIN_CHUNK_CHARS = 100  # a shorter tail of a page is not a chunk of its own
MAX_TOKENS = 64
FROZEN_LAYERS = 3  # of MiniLM's 6: half the backward pass
BATCH = 32
NEGATIVES_PER_STEP = 3  # every query's negatives in each step (its n-tuple)
LR = 5e-5
N_EVAL = 1000
SCALE = 20.0  # MultipleNegativesRankingLoss's default


def cut(text: str) -> str:
    return text if len(text) <= DOC_CHARS else text[:DOC_CHARS].rsplit(" ", 1)[0]


def chunks(text: str) -> list[str]:
    """`text` in consecutive chunks of at most DOC_CHARS, cut at word boundaries."""
    out, rest = [], text.strip()
    while rest:
        piece = cut(rest)
        if not piece:  # one word longer than a chunk
            piece = rest[:DOC_CHARS]
        if len(piece) >= MIN_CHUNK_CHARS or not out:
            out.append(piece)
        rest = rest[len(piece) :].strip()
    return out


def build_dataset() -> pl.DataFrame:
    """(page, query, doc, more, split): `doc` is the page's first chunk, `more` its further
    chunks; pages deduplicated by the folded first chunk."""
    pages = list(iter_pages())
    if len(pages) < 1500:
        raise SystemExit(
            f"only {len(pages)} usable manual pages found; install more (e.g. the Debian "
            "packages manpages manpages-dev) and run again"
        )
    cut_pages = [chunks(p.document) for p in pages]
    df = pl.DataFrame(
        {
            "page": [p.name for p in pages],
            "query": [p.query for p in pages],
            "doc": [c[0] for c in cut_pages],
            "more": [c[1:] for c in cut_pages],
        }
    )
    df = df.with_columns(pl.Series("key", fold_many(df["doc"].to_list())))
    df = df.unique("key", keep="first", maintain_order=True).drop("key")
    docs, queries = df["doc"].to_list(), fold_many(df["query"].to_list())
    # split units: documents joined by near-duplication or by a shared query text
    edges = [
        (i, j) for i, j, _ in near_duplicate_pairs(fold_many(docs), DedupConfig(near_threshold=0.5))
    ]
    first: dict[str, int] = {}
    for i, q in enumerate(queries):
        edges.append((first.setdefault(q, i), i))
    root = components(len(docs), np.array(edges, dtype=np.int64).reshape(-1, 2))
    order = sorted(set(root.tolist()), key=lambda r: hashlib.blake2b(docs[r].encode()).digest())
    eval_units, n = set(), 0
    size = {r: int((root == r).sum()) for r in order}
    for r in order:
        if n >= N_EVAL:
            break
        eval_units.add(r)
        n += size[r]
    split = ["eval" if r in eval_units else "train" for r in root.tolist()]
    return df.with_columns(pl.Series("split", split))


# --- methods ------------------------------------------------------------------------------------


def mining_corpus(train: pl.DataFrame) -> pl.DataFrame:
    """(text, page): the training pages' first chunks, then their further chunks."""
    first = train.select(pl.col("doc").alias("text"), "page")
    more = train.select("page", "more").explode("more").drop_nulls("more")
    return pl.concat([first, more.select(pl.col("more").alias("text"), "page")]).unique(
        "text", keep="first", maintain_order=True
    )


def random_negatives(train: pl.DataFrame, corpus: list[str], seed: int = 0) -> list[list[str]]:
    rng = random.Random(seed)
    return [[d for d in rng.sample(corpus, 4) if d != pos][:3] for pos in train["doc"]]


def st_negatives(train: pl.DataFrame, corpus: list[str], model, **kwargs) -> list[list[str]]:
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    data = Dataset.from_dict(
        {"query": train["query"].to_list(), "positive": train["doc"].to_list()}
    )
    out = mine_hard_negatives(
        data, model, corpus=corpus, output_format="n-tuple", verbose=False, **kwargs
    )
    found: dict[tuple[str, str], list[str]] = {}
    for row in out:
        negs = [row[k] for k in row if k.startswith("negative")]
        found.setdefault((row["query"], row["positive"]), []).extend(negs)
    return [found.get((q, p), []) for q, p in train.select("query", "doc").iter_rows()]


def pipeline_negatives(
    train: pl.DataFrame, chunks_table: pl.DataFrame, name: str, overrides: dict
) -> tuple[list[list[str]], dict]:
    """Run the pipeline in pairs mode on the training pairs, with the pages' further chunks as
    `corpus_paths`; its FlagEmbedding export's negatives per pair, and the manifest."""
    from flows.build import run_pipeline
    from schemas.config import PipelineConfig

    pairs, corpus = WORK / "train-pairs.jsonl", WORK / "train-chunks.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"query": q, "positive": d, "page": p}) + "\n"
            for q, d, p in train.select("query", "doc", "page").iter_rows()
        )
    )
    corpus.write_text(
        "".join(json.dumps({"text": t, "page": p}) + "\n" for t, p in chunks_table.iter_rows())
    )
    raw = {
        "name": f"quality-{name}",
        "input": {
            "mode": "pairs",
            "paths": [str(pairs)],
            "corpus_paths": [str(corpus)],
            "document_column": "page",
        },
        "split": {"eval_fraction": 0.0},
        "output": {"dir": str(WORK / "runs")},
    }
    for key, value in overrides.items():
        section, _, field = key.partition(".")
        raw.setdefault(section, {})[field] = value
    run_dir, doc = run_pipeline(PipelineConfig.model_validate(raw))
    found: dict[tuple[str, str], list[str]] = {}
    with open(run_dir / "exports" / "flagembedding" / "train.jsonl") as f:
        for line in f:
            rec = json.loads(line)
            found[(rec["query"], rec["pos"][0])] = rec["neg"]
    return [found.get((q, p), []) for q, p in train.select("query", "doc").iter_rows()], doc


METHODS = {
    "tripletforge": {},
    "tf_simans": {"mining.sampling_strategy": "simans"},
    "tf_written": {"generation.negative_levels": [1]},
}
OPTIONAL = {
    # what the page column buys (+0.0027 in the fifth run; left out of the default run for time)
    "tf_no_document": {"input.document_column": None},
    # the defaults before they were tuned by this benchmark: NV-Retriever's 95% rule, 4 negatives
    "tf_nv95": {"mining.max_positive_ratio": 0.95, "mining.num_negatives": 4},
}


# --- training and evaluation --------------------------------------------------------------------


def load_model():
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_path()), device="cpu", local_files_only=True)
    model.max_seq_length = MAX_TOKENS
    return model


def encode(model, texts: list[str]) -> np.ndarray:
    import torch

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=BF16):
        vectors = model.encode(
            texts,
            batch_size=64,
            convert_to_numpy=True,
            show_progress_bar=False,
            normalize_embeddings=True,
        )
    return np.asarray(vectors, dtype=np.float32)


def ndcg_at_10(
    model,
    queries: list[str],
    corpus: list[str],
    qrels: list[set[int]],
    states: dict[str, torch.Tensor] | None = None,
) -> float:
    """nDCG@10 of `queries` against `corpus`; with `states`, each text's frozen layers' output
    (unchanged by fine-tuning) is read from there and only the trained layers run."""
    vectors = encode if states is None else lambda m, texts: encode_upper(m, texts, states)
    scores = vectors(model, queries) @ vectors(model, corpus).T
    top = np.argsort(-scores, axis=1)[:, :10]
    total = 0.0
    for ranked, relevant in zip(top, qrels, strict=True):
        dcg = sum(1 / math.log2(r + 2) for r, d in enumerate(ranked) if d in relevant)
        ideal = sum(1 / math.log2(r + 2) for r in range(min(10, len(relevant))))
        total += dcg / ideal
    return total / len(qrels)


def frozen_states(model, texts: list[str]) -> dict[str, torch.Tensor]:
    """Each text's hidden states after the frozen layers (embeddings and the lower
    FROZEN_LAYERS), computed once: they are the same for every method and seed, so a training
    step only runs the layers it trains."""
    import torch

    bert = model[0].auto_model
    bert.eval()
    out: dict[str, torch.Tensor] = {}
    unique = list(dict.fromkeys(texts))
    for i in range(0, len(unique), 64):
        batch = unique[i : i + 64]
        feats = model.tokenizer(
            batch, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
        )
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=BF16):
            hidden = bert(**feats, output_hidden_states=True).hidden_states[FROZEN_LAYERS]
        for text, h, n in zip(batch, hidden, feats["attention_mask"].sum(1).tolist(), strict=True):
            out[text] = h[:n].float().clone()
    return out


def _upper_encoder(model):
    """(embed, restore): `embed(texts, states)` runs only the trained layers, pooling and
    normalisation on cached frozen states; `restore()` puts the model back together."""
    import torch

    class Given(torch.nn.Module):
        """In place of BERT's embedding layer: the input already is the frozen layers' output."""

        def forward(self, inputs_embeds=None, **_):
            return inputs_embeds

    bert = model[0].auto_model
    embeddings, layers = bert.embeddings, bert.encoder.layer
    bert.embeddings = Given()
    bert.encoder.layer = torch.nn.ModuleList(list(layers)[FROZEN_LAYERS:])

    def embed(texts: list[str], states: dict[str, torch.Tensor]) -> torch.Tensor:
        rows = [states[t] for t in texts]
        x = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
        mask = torch.zeros(x.shape[:2], dtype=torch.long)
        for i, r in enumerate(rows):
            mask[i, : len(r)] = 1
        tokens = bert(inputs_embeds=x, attention_mask=mask).last_hidden_state
        features = {"token_embeddings": tokens, "attention_mask": mask}
        for module in list(model)[1:]:  # Pooling, Normalize
            features = module(features)
        return features["sentence_embedding"]

    def restore() -> None:
        bert.embeddings, bert.encoder.layer = embeddings, layers

    return embed, restore


def encode_upper(model, texts: list[str], states: dict[str, torch.Tensor]) -> np.ndarray:
    """`encode`, from the cached frozen states of `texts`."""
    import torch

    embed, restore = _upper_encoder(model)
    model.eval()
    out = []
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=BF16):
            for i in range(0, len(texts), 64):
                out.append(embed(texts[i : i + 64], states).float().numpy())
    finally:
        restore()
    return np.concatenate(out).astype(np.float32)


def check_upper_encoder(model, states: dict[str, torch.Tensor], texts: list[str]) -> None:
    """The cached path must give what the model gives: fail loudly if a library change breaks
    the module swap."""
    expected = encode(model, texts)
    got = encode_upper(model, texts, states)
    worst = float(np.abs((got * expected).sum(1) - 1).max())
    if worst > 0.01:
        raise SystemExit(f"cached frozen layers disagree with the model (cosine off by {worst})")


def pick_negatives(negatives: list[str], rng: random.Random) -> list[str]:
    """A query's NEGATIVES_PER_STEP negatives for one step: all of them when it has exactly
    that many, a seeded sample when more (written passages come on top of the mined ones), the
    same ones repeated when fewer."""
    if len(negatives) > NEGATIVES_PER_STEP:
        return rng.sample(negatives, NEGATIVES_PER_STEP)
    return [negatives[k % len(negatives)] for k in range(NEGATIVES_PER_STEP)]


def tuple_batches(negatives: list[list[str]], steps: int, rng: random.Random) -> list[list[int]]:
    """`steps` batches of query indices for n-tuple training: each pass over the queries that
    have negatives is shuffled, and a partial last batch is left to the next pass."""
    rows = [i for i, n in enumerate(negatives) if n]
    batches: list[list[int]] = []
    while len(batches) < steps:
        order = rows[:]
        rng.shuffle(order)
        batches += [order[i : i + BATCH] for i in range(0, len(order) - BATCH + 1, BATCH)]
    return batches[:steps]


def triplet_batches(
    queries: list[str],
    positives: list[str],
    negatives: list[list[str]],
    steps: int,
    rng: random.Random,
) -> list[list[tuple[int, str]]]:
    """`steps` batches of (query index, negative) rows, one row per negative: the triplets
    `mine_hard_negatives` outputs by default. Batches are filled the way sentence-transformers'
    NoDuplicatesBatchSampler (its advice for MultipleNegativesRankingLoss) fills them: a row
    whose query, positive or negative is already in the batch waits for a later one, so a
    query's own positive is never an in-batch negative for it. Each pass over the rows is
    shuffled; rows a pass could not place go first in the next."""
    rows = [(i, n) for i, negs in enumerate(negatives) for n in negs]
    batches: list[list[tuple[int, str]]] = []
    pending: list[tuple[int, str]] = []
    refilled = False
    while rows and len(batches) < steps:
        batch: list[tuple[int, str]] = []
        seen: set[str] = set()
        rest = []
        for i, n in pending:
            texts = {queries[i], positives[i], n}
            if len(batch) < BATCH and not seen & texts:
                batch.append((i, n))
                seen |= texts
            else:
                rest.append((i, n))
        if len(batch) == BATCH:
            batches.append(batch)
            pending, refilled = rest, False
        elif refilled:
            raise ValueError(f"the rows cannot fill a batch of {BATCH} without a repeated text")
        else:  # the pass is used up: the next one, after what this one left
            fresh = rows[:]
            rng.shuffle(fresh)
            pending, refilled = pending + fresh, True
    return batches


def fine_tune(
    model,
    queries: list[str],
    positives: list[str],
    negatives: list[list[str]],
    steps: int,
    seed: int,
    states: dict[str, torch.Tensor],
    fmt: str = "n-tuple",
) -> float:
    """`steps` batches with MultipleNegativesRankingLoss. `fmt` "triplet": (query, positive,
    negative) rows, one per negative (`triplet_batches`); "n-tuple": (query, positive,
    NEGATIVES_PER_STEP negatives: `pick_negatives`) rows, one per query. Returns the mean loss
    of the last ten steps."""
    import torch

    try:
        from sentence_transformers.sentence_transformer.losses import (
            MultipleNegativesRankingLoss,
        )
    except ImportError:  # an older sentence-transformers
        from sentence_transformers.losses import MultipleNegativesRankingLoss

    torch.manual_seed(seed)
    rng = random.Random(seed)
    if fmt == "triplet":
        steps_columns = [
            [[queries[i] for i, _ in b], [positives[i] for i, _ in b], [n for _, n in b]]
            for b in triplet_batches(queries, positives, negatives, steps, rng)
        ]
    elif fmt == "n-tuple":
        steps_columns = []
        for batch in tuple_batches(negatives, steps, rng):
            picked = [pick_negatives(negatives[i], rng) for i in batch]
            steps_columns.append(
                [[queries[i] for i in batch], [positives[i] for i in batch]]
                + [[row[k] for row in picked] for k in range(NEGATIVES_PER_STEP)]
            )
    else:
        raise ValueError(f"unknown training format {fmt!r}")
    bert = model[0].auto_model
    for layer in bert.encoder.layer[:FROZEN_LAYERS]:
        for p in layer.parameters():
            p.requires_grad = False
    for p in bert.embeddings.parameters():
        p.requires_grad = False
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    warmup = max(1, steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, (steps - s) / steps)
    )
    loss_fn = MultipleNegativesRankingLoss(model, scale=SCALE)
    embed, restore = _upper_encoder(model)
    model.train()
    losses = []
    try:
        for columns in steps_columns:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=BF16):
                loss = loss_fn.compute_loss_from_embeddings(
                    [embed(c, states) for c in columns], None
                )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
    finally:
        restore()
    model.eval()
    return float(np.mean(losses[-10:]))


def data_checks(
    model, train: pl.DataFrame, negatives: list[list[str]], page_of: dict[str, str]
) -> dict[str, float]:
    """Share of negatives that copy their positive, that come from its own page, and that
    score above it (base model)."""
    pairs = [
        (q, p, n)
        for (q, p), ns in zip(train.select("query", "doc").iter_rows(), negatives, strict=True)
        for n in ns
    ]
    if not pairs:
        return {"negatives": 0, "near_copies": 0.0, "same_page": 0.0, "above_positive": 0.0}
    qs, ps, ns = zip(*pairs, strict=True)
    same_page = sum(
        page_of.get(n) is not None and page_of.get(n) == page_of[p]
        for p, n in zip(ps, ns, strict=True)
    )
    texts = sorted(set(ps) | set(ns))
    shingles = dict(zip(texts, shingle_sets(texts, 3), strict=True))
    copies = sum(jaccard(shingles[p], shingles[n]) >= 0.9 for p, n in zip(ps, ns, strict=True))
    vec = dict(zip(texts, encode(model, texts), strict=True))
    qvec = dict(zip(sorted(set(qs)), encode(model, sorted(set(qs))), strict=True))
    above = sum(float(qvec[q] @ vec[n]) > float(qvec[q] @ vec[p]) for q, p, n in pairs)
    return {
        "negatives": len(pairs),
        "near_copies": copies / len(pairs),
        "same_page": same_page / len(pairs),
        "above_positive": above / len(pairs),
    }


BF16 = False


def main() -> None:
    global BF16
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument(
        "--written", type=int, default=128, help="queries that get written passages"
    )
    parser.add_argument("--only", default="", help="comma-separated methods (default: all)")
    parser.add_argument(
        "--format",
        choices=("triplet", "n-tuple"),
        default="n-tuple",
        help="training rows: (query, positive, 3 negatives) n-tuples, one pass over the pairs "
        "(52 steps), or (query, positive, negative) triplets, mine_hard_negatives' default "
        "output, one pass over 3 per pair (156 steps: ~2.5x the time, over 30 min on 2 cores)",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="another pipeline variant, NAME:section.key=value,... (to choose defaults by T)",
    )
    args = parser.parse_args()
    for name in args.only.split(","):
        if name in OPTIONAL:
            METHODS[name] = OPTIONAL[name]
    for spec in args.variant:
        name, _, sets = spec.partition(":")
        METHODS[name] = {
            k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in sets.split(","))
        }
    from tasks.embedder import resolve_precision

    BF16 = resolve_precision("auto", "cpu") == "bfloat16"
    seeds = [int(s) for s in args.seeds.split(",")]
    WORK.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    df = build_dataset()
    train, evals = df.filter(pl.col("split") == "train"), df.filter(pl.col("split") == "eval")
    corpus = df["doc"].to_list()
    index = {d: i for i, d in enumerate(corpus)}
    grouped = evals.group_by("query", maintain_order=True).agg("doc")
    eval_queries = grouped["query"].to_list()
    qrels = [{index[d] for d in docs} for docs in grouped["doc"]]
    mining = mining_corpus(train)
    more = mining.filter(~pl.col("text").is_in(train["doc"].implode()))
    page_of = dict(mining.iter_rows())
    mining_texts = mining["text"].to_list()
    print(
        f"{len(df)} pages: {train.height} training pairs, {len(eval_queries)} eval queries, "
        f"corpus {len(corpus)} documents; mining corpus {len(mining_texts)} chunks "
        f"({more.height} beyond the first, from {more['page'].n_unique()} pages) "
        f"({time.perf_counter() - start:.0f} s); "
        f"{os.cpu_count()} cores, {cpu_description()}, training in {'bf16' if BF16 else 'float32'}"
    )
    only = set(filter(None, args.only.split(",")))
    wanted = lambda name: not only or name in only  # noqa: E731
    base = load_model()
    negatives: dict[str, list[list[str]]] = {}
    timing: dict[str, float] = {}
    notes: dict[str, str] = {}
    for name, kwargs in (
        ("random", None),
        ("st_mined", {}),
        ("st_margin", {"relative_margin": 0.05}),
    ):
        if not wanted(name):
            continue
        t0 = time.perf_counter()
        negatives[name] = (
            random_negatives(train, mining_texts)
            if kwargs is None
            else st_negatives(train, mining_texts, base, **kwargs)
        )
        timing[name] = time.perf_counter() - t0
    for name, overrides in METHODS.items():
        if not wanted(name):
            continue
        if name == "tf_written":
            overrides = {**overrides, "generation.max_written_queries": args.written}
        t0 = time.perf_counter()
        negatives[name], doc = pipeline_negatives(train, more, name, overrides)
        timing[name] = time.perf_counter() - t0
        mine = doc["stages"]["mine"]
        notes[name] = (
            f"kept {mine['rows_out']}/{mine['rows_in']} queries; "
            f"filtered {mine['extra']['filtered']}"
        )
        if name == "tf_written":
            written = doc["stages"].get("generate_passages", {})
            notes[name] += (
                f"; written {written.get('rows_out', 0)}/{written.get('rows_in', 0)}, kept as "
                f"negatives {mine['extra'].get('generated_kept', 0)}, removed "
                f"{mine['extra'].get('filtered_generated', {})}"
            )
    # one pass over the pairs' rows: a query's 3 negatives are 3 triplet rows or 1 n-tuple
    rows_per_pair = NEGATIVES_PER_STEP if args.format == "triplet" else 1
    steps = rows_per_pair * train.height // BATCH
    results: dict[str, list[float]] = {"base": [ndcg_at_10(base, eval_queries, corpus, qrels)]}
    checks = {name: data_checks(base, train, negs, page_of) for name, negs in negatives.items()}
    t0 = time.perf_counter()
    texts = train["query"].to_list() + train["doc"].to_list()
    texts += [n for negs in negatives.values() for row in negs for n in row]
    states = frozen_states(base, texts + eval_queries + corpus)
    check_upper_encoder(load_model(), states, texts[:: max(1, len(texts) // 16)][:16])
    cached_base = ndcg_at_10(base, eval_queries, corpus, qrels, states)
    if abs(cached_base - results["base"][0]) > 0.002:
        raise SystemExit(f"cached evaluation {cached_base:.4f} != {results['base'][0]:.4f}")
    print(
        f"frozen layers' states of {len(states)} texts ({time.perf_counter() - t0:.0f} s); "
        f"base nDCG@10 {results['base'][0]:.4f}, from them {cached_base:.4f}"
    )
    losses: dict[str, list[float]] = {}
    for seed in seeds:
        for name, negs in negatives.items():
            t0 = time.perf_counter()
            model = load_model()
            loss = fine_tune(
                model,
                train["query"].to_list(),
                train["doc"].to_list(),
                negs,
                steps,
                seed,
                states,
                args.format,
            )
            score = ndcg_at_10(model, eval_queries, corpus, qrels, states)
            results.setdefault(name, []).append(score)
            losses.setdefault(name, []).append(loss)
            print(
                f"  {name:13s} seed {seed}: nDCG@10 {score:.4f}, final loss {loss:.3f} "
                f"({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    print(f"\n{steps} steps x {BATCH} {args.format} rows per method and seed; seeds {seeds}\n")
    columns = ["method", "nDCG@10 mean", "per seed", "spread", "queries trained", "negatives"]
    columns += ["near copies", "same page", "above positive", "mining s"]
    print("| " + " | ".join(columns) + " |")
    print("|" + " --- |" * len(columns))
    for name, scores in results.items():
        c = checks.get(name, {})
        trained = sum(1 for n in negatives[name] if n) if name in negatives else 0
        print(
            f"| {name} | {np.mean(scores):.4f} | {' / '.join(f'{s:.4f}' for s in scores)} | "
            f"{max(scores) - min(scores):.4f} | {trained or '-'} | {c.get('negatives', '-')} | "
            f"{c.get('near_copies', 0):.3f} | {c.get('same_page', 0):.3f} | "
            f"{c.get('above_positive', 0):.3f} | "
            f"{timing.get(name, 0):.0f} |"
        )
    for name, note in notes.items():
        print(f"{name}: {note}")
    if "st_mined" in results and len(seeds) > 1:
        # a seed fixes the torch seed and the shuffling for every method: ahead on each seed?
        print("\npaired by seed, minus st_mined:")
        for name, scores in results.items():
            if name in ("base", "st_mined"):
                continue
            diffs = [a - b for a, b in zip(scores, results["st_mined"], strict=True)]
            print(
                f"  {name:13s} {np.mean(diffs):+.4f} ({' / '.join(f'{d:+.4f}' for d in diffs)}), "
                f"ahead on {sum(d > 0 for d in diffs)} of {len(diffs)} seeds"
            )
    print(f"total {time.perf_counter() - start:.0f} s")
    mean = {k: float(np.mean(v)) for k, v in results.items()}
    print(
        f"quality base={mean['base']:.4f} random={mean.get('random', float('nan')):.4f} "
        f"st_mined={mean.get('st_mined', float('nan')):.4f} "
        f"tripletforge={mean.get('tripletforge', float('nan')):.4f}"
    )


if __name__ == "__main__":
    main()
