"""Memory of a long-lived embedder as it embeds more and more text: unpadded vs padded batches.

The embedder is a worker that lives for the whole run, so whatever it keeps per call adds up
with corpus size. Each variant runs in its own process: load MiniLM (bf16 autocast where the CPU
has native bf16, as the pipeline does), then embed N passages in calls of 1,000 texts (batches of
32, as the flow does) and record the process's RSS after each call, over its RSS after loading.

- unpadded: sentence-transformers pads each batch to its longest text, so every batch length
  from 1 to 256 tokens is a new input shape, and the CPU kernels built for each shape stay cached;
- padded: `embedding.pad_to_multiple_of` (default 32) rounds every batch's length up, so the model
  sees at most 8 lengths.

Last line: `embed_memory growth_mb_unpadded=A growth_mb_padded=B texts=N speed_ratio=S`
(growth: RSS after the last call over RSS after loading; S: padded texts/s over unpadded).
Usage: .venv/bin/python benchmarks/embed_memory.py [N]
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CALL = 1000


def child(n: int, pad: int | None) -> None:
    """One variant, in this process; prints one JSON line."""
    sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
    import psutil
    from dedup import base_corpus, expand

    from tasks.embedder import Embedder, resolve_precision
    from tasks.models import minilm_path

    texts = expand(base_corpus(n), n, random.Random(0))
    embedder = Embedder(str(minilm_path()), "minilm", precision=resolve_precision("auto", "cpu"))
    proc = psutil.Process()
    loaded = proc.memory_info().rss
    growth, start = [], time.perf_counter()
    for i in range(0, n, CALL):
        embedder.encode(texts[i : i + CALL], batch_size=32, pad_to_multiple_of=pad)
        growth.append((min(i + CALL, n), (proc.memory_info().rss - loaded) / 2**20))
    seconds = time.perf_counter() - start
    print(json.dumps({"growth": growth, "seconds": seconds, "precision": embedder.precision}))


def run(n: int, pad: int | None) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(n), str(pad or 0)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 8192
    results = {"unpadded": run(n, None), "padded to 32": run(n, 32)}
    plain, padded = results["unpadded"], results["padded to 32"]
    # after the first call and after the calls that pass a quarter, half and all of the texts
    rows = sorted(
        {
            next(i for i, (done, _) in enumerate(plain["growth"]) if done >= c)
            for c in (1, n // 4, n // 2, n)
        }
    )
    print(f"{n} passages, calls of {CALL}, batches of 32, {plain['precision']}")
    print("RSS over the loaded model (MB) after embedding:")
    print(f"{'texts':>8} " + " ".join(f"{name:>14}" for name in results))
    for i in rows:
        done = plain["growth"][i][0]
        print(f"{done:>8} " + " ".join(f"{r['growth'][i][1]:>14.0f}" for r in results.values()))
    for name, r in results.items():
        print(f"{name}: {n / r['seconds']:.1f} texts/s")
    print(
        f"embed_memory growth_mb_unpadded={plain['growth'][-1][1]:.0f} "
        f"growth_mb_padded={padded['growth'][-1][1]:.0f} texts={n} "
        f"speed_ratio={plain['seconds'] / padded['seconds']:.2f}"
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(int(sys.argv[2]), int(sys.argv[3]) or None)
    else:
        main()
