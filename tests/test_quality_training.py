"""benchmarks/quality.py's training path: frozen layers computed once per text, triplet and
n-tuple steps.

The benchmark swaps BERT's embedding layer and lower layers out for cached states while it
trains; these tests pin that the swap gives the model's own embeddings, that a step trains only
the upper layers and that the model comes back whole.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import quality  # noqa: E402

pytestmark = pytest.mark.slow

TEXTS = [
    "copy a string",
    "The strcpy() function copies the string pointed to by src, including the terminating null "
    "byte, to the buffer pointed to by dest.",
    "list directory contents",
    "List information about the FILEs (the current directory by default). Sort entries "
    "alphabetically if none of -cftuvSUX nor --sort is specified.",
    "receive a message from a socket",
    "The recv() call is used to receive messages from a socket.",
    "report a snapshot of the current processes",
    "ps displays information about a selection of the active processes.",
]


@pytest.fixture()
def model():
    return quality.load_model()


def test_cached_frozen_layers_give_the_models_embeddings(model):
    states = quality.frozen_states(model, TEXTS)
    assert set(states) == set(TEXTS)
    quality.check_upper_encoder(model, states, TEXTS)  # raises if they disagree
    # the model is whole again: six layers and its embedding layer
    bert = model[0].auto_model
    assert len(bert.encoder.layer) == 6
    assert bert.embeddings.__class__.__name__ == "BertEmbeddings"
    # the check can fail: states taken after the wrong layer are caught
    wrong = {t: s * 0.5 + 1.0 for t, s in states.items()}
    with pytest.raises(SystemExit, match="disagree"):
        quality.check_upper_encoder(model, wrong, TEXTS)


def test_pick_negatives_fills_every_column():
    import random

    rng = random.Random(0)
    assert quality.pick_negatives(["a"], rng) == ["a", "a", "a"]
    assert quality.pick_negatives(["a", "b", "c"], rng) == ["a", "b", "c"]
    picked = quality.pick_negatives(["a", "b", "c", "d"], rng)
    assert len(picked) == 3 == len(set(picked)) and set(picked) <= {"a", "b", "c", "d"}


def test_fine_tune_trains_only_the_upper_layers_on_n_tuples(model, monkeypatch):
    monkeypatch.setattr(quality, "BATCH", 2)
    queries, positives = TEXTS[0::2], TEXTS[1::2]
    # one negative (repeated to three), four (a sample of three), none (not trained)
    negatives = [
        [positives[1]],
        [positives[2], positives[3], positives[0], TEXTS[0]],
        [positives[0]],
        [],
    ]
    states = quality.frozen_states(model, TEXTS)
    bert = model[0].auto_model
    before = {n: p.detach().clone() for n, p in bert.named_parameters()}
    loss = quality.fine_tune(model, queries, positives, negatives, 3, 0, states, "n-tuple")
    assert np.isfinite(loss) and loss > 0
    changed = {n for n, p in bert.named_parameters() if not p.detach().equal(before[n])}
    lower = [f"encoder.layer.{i}." for i in range(quality.FROZEN_LAYERS)]
    assert not any(n.startswith(("embeddings.", *lower)) for n in changed)
    assert any(n.startswith("encoder.layer.5.") for n in changed)
    assert len(bert.encoder.layer) == 6 and not model.training
    # the trained model still encodes through its normal path
    assert quality.encode(model, TEXTS[:2]).shape == (2, 384)


def test_triplet_batches_are_one_row_per_negative_without_duplicates(monkeypatch):
    import random

    monkeypatch.setattr(quality, "BATCH", 4)
    queries = [f"q{i}" for i in range(40)]
    positives = [f"p{i}" for i in range(40)]
    negatives = [[f"n{i}-{k}" for k in range(3)] for i in range(40)]
    negatives[0][0] = "p1"  # q1's positive: q0 and q1 may never share a batch
    negatives[2][0] = negatives[3][0] = "shared"  # one passage, negative of two queries
    negatives[39] = []  # not trained
    rows = [(i, n) for i, negs in enumerate(negatives) for n in negs]

    def texts(batch):
        return [t for i, n in batch for t in (queries[i], positives[i], n)]

    batches = quality.triplet_batches(queries, positives, negatives, 25, random.Random(0))
    assert len(batches) == 25 and all(len(b) == 4 for b in batches)
    seen = [r for b in batches for r in b]
    assert len(seen) == len(set(seen)) and set(seen) <= set(rows)  # within a pass: once each
    assert all(len(texts(b)) == len(set(texts(b))) for b in batches)
    # past one pass (117 rows, 29 batches) the next starts with what the first left over
    longer = quality.triplet_batches(queries, positives, negatives, 60, random.Random(0))
    assert longer[:25] == batches
    counts = {r: sum(r in b for b in longer) for r in rows}
    assert set(counts.values()) <= {1, 2, 3} and min(counts.values()) >= 1
    assert all(len(texts(b)) == len(set(texts(b))) for b in longer)
    # seeded: the same seed gives the same batches, another seed other ones
    again = quality.triplet_batches(queries, positives, negatives, 60, random.Random(0))
    assert again == longer
    assert quality.triplet_batches(queries, positives, negatives, 60, random.Random(1)) != longer
    assert quality.triplet_batches(queries, positives, [[]] * 40, 3, random.Random(0)) == []
    # rows that can never fill a batch (one query) are an error, not an endless loop
    with pytest.raises(ValueError, match="cannot fill a batch"):
        quality.triplet_batches(["q"], ["p"], [["a", "b", "c", "d"]], 1, random.Random(0))


def test_fine_tune_on_triplets(model, monkeypatch):
    monkeypatch.setattr(quality, "BATCH", 2)
    queries, positives = TEXTS[0::2], TEXTS[1::2]
    other = ["tar saves many files together into a single archive.", "Print the date."]
    other.append("sleep pauses for NUMBER seconds.")
    negatives = [other[:2], [other[2]], [positives[3]], []]
    states = quality.frozen_states(model, TEXTS + other)
    before = {n: p.detach().clone() for n, p in model[0].auto_model.named_parameters()}
    loss = quality.fine_tune(model, queries, positives, negatives, 2, 0, states, "triplet")
    assert np.isfinite(loss) and loss > 0
    after = dict(model[0].auto_model.named_parameters())
    assert any(not after[n].detach().equal(before[n]) for n in before)
    with pytest.raises(ValueError, match="unknown training format"):
        quality.fine_tune(model, queries, positives, negatives, 1, 0, states, "pairs")
