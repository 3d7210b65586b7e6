"""Catalogues of bench_serve.py: the synthetic 100,000-item run (built on first use, random-init
models), the request bodies drawn from a run's real users, and the scoring microbenchmark
(Recommender.recommend_many in-process, no HTTP).
"""

import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIG_ITEMS, BIG_USERS, BIG_MEAN_LENGTH = 100_000, 20_000, 30
K = 10  # items per answer (the `k` of every request body)


def build_big_run(run: Path) -> None:
    """A tiny run dir with a 100k-item catalogue: prepared synthetic data + random-init models."""
    if (run / "student" / "model.json").exists() and (run / "teacher" / "model.json").exists():
        return
    import yaml
    run.mkdir(parents=True, exist_ok=True)
    cfg = {"name": run.name, "output_dir": str(run), "seed": 0,
           "data": {"format": "synthetic", "min_user_interactions": 5, "min_item_interactions": 1,
                    "synthetic": {"users": BIG_USERS, "items": BIG_ITEMS, "mean_length": BIG_MEAN_LENGTH,
                                  "popularity_skew": 0.0, "clusters": 20, "seed": 0}}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    print(f"[build] raykd prepare {run / 'config.yaml'} (100k-item synthetic catalogue)", flush=True)
    t = time.time()
    subprocess.run([sys.executable, "-m", "raykd.cli", "prepare", str(run / "config.yaml")], check=True, cwd=REPO)
    print(f"[build] prepared in {time.time() - t:.0f} s", flush=True)
    import pyarrow.parquet as pq
    import torch

    from raykd.core import models
    num_items = pq.read_table(run / "data" / "items.parquet").num_rows
    torch.manual_seed(0)
    shapes = {"student": {"dim": 16, "layers": 1, "heads": 1}, "teacher": {"dim": 64, "layers": 2, "heads": 2}}
    for name, shape in shapes.items():
        desc = {"family": "sasrec", "num_items": num_items, "max_len": 50, "dropout": 0.2, **shape}
        model = models.build_model(desc).eval()
        models.save_model(run / name, model, desc, {"fingerprint": f"bench-random-init-{name}",
                                                    "note": "random initial weights (serving benchmark)"})
        print(f"[build] {run / name}: sasrec {shape['dim']}x{shape['layers']}, {num_items} items, "
              f"{models.count_params(model)} params (random init)", flush=True)


def request_bodies(run: Path, n: int, seed: int = 0) -> list[dict]:
    """`n` POST /recommend bodies: the last <= 50 items (raw ids) of random real users' histories."""
    import numpy as np
    import pyarrow.parquet as pq

    from raykd.core import sequences
    data = run / "data"
    raw = pq.read_table(data / "items.parquet")["raw_id"].to_pylist()
    split = sequences.read_split(data)
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(split["user"]), size=min(n, len(split["user"])), replace=False)
    bodies = []
    for r in rows:
        hist = np.append(split["train"][r], split["valid"][r])[-50:]
        bodies.append({"history": [raw[i - 1] for i in hist.tolist()], "k": K})
    return bodies


def _time_batches(rec, parsed: list, batch: int, seconds: float) -> tuple[int, float]:
    """Requests scored and seconds taken: recommend_many over `parsed` in batches, for ~`seconds`."""
    rec.recommend_many(parsed[:batch])
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds and n < 20_000:
        for i in range(0, len(parsed), batch):
            rec.recommend_many(parsed[i:i + batch])
            n += len(parsed[i:i + batch])
            if time.perf_counter() - t0 > seconds:
                break
    return n, time.perf_counter() - t0


def scoring_microbench(runs: dict, catalogues: list[str], bodies_files: dict, seconds: float) -> list[dict]:
    """Recommender.recommend_many in this process (no HTTP): ms per request by batch size and torch
    intra-op threads, so the HTTP numbers can be split into model cost and serving cost."""
    import torch

    from raykd.serve.recommender import Recommender
    rows = []
    saved = torch.get_num_threads()
    print("\n## scoring alone: Recommender.recommend_many in-process, ms per request (req/s)")
    print("| cat   | model   | threads | batch 1          | batch 8          | batch 32         |")
    print("|-------|---------|---------|------------------|------------------|------------------|")
    for cat in catalogues:
        bodies = json.loads(bodies_files[cat].read_text())[:64]
        for model in ("student", "teacher"):
            rec = Recommender(runs[cat] / model)
            parsed = [rec.parse(b) for b in bodies]
            for threads in (1, 2):
                torch.set_num_threads(threads)
                cells = []
                for batch in (1, 8, 32):
                    n, dt = _time_batches(rec, parsed, batch, seconds)
                    ms = 1000 * dt / n
                    cells.append(f"{ms:7.2f} ({n / dt:6.0f})")
                    rows.append({"catalogue": cat, "model": model, "threads": threads, "batch": batch,
                                 "ms_per_request": round(ms, 3), "req_per_s": round(n / dt, 1)})
                print(f"| {cat:5} | {model:7} | {threads:7} | " + " | ".join(cells) + " |", flush=True)
    torch.set_num_threads(saved)
    return rows
