"""The training step against the catalogue size: raykd's step (dense and sparse item table) vs a plain loop.

    python benchmarks/bench_step.py                                  # V = 50k and 1M, SASRec 64 x 2
    python benchmarks/bench_step.py --items 50000 200000 1000000 --steps 20

One thread (a 1-CPU Ray worker's share), one process, side by side for every catalogue size V:

    plain   the floor: a plain PyTorch loop with the same model and the same log-Q sampled softmax
            (raykd.core.sampled_losses, 512 negatives shared by the batch), dense Adam on every
            parameter, the item table included
    dense   raykd's step (raykd.training.loop.train_epoch with make_optimizer / make_loss of a
            RunSpec) with `train.sparse_table: false`
    sparse  the same with the default `train.sparse_table: true`: the table's gradient holds only
            the rows the step used and SparseAdam steps just those; Adam steps the rest

Every run takes `--steps` steps of 256 windows x 50 positions after 2 warm-up steps, on the same
random windows. Printed: ms a step, windows/s, each step's cost at V over its cost at the smallest V
(target <= 1.5 at 1M vs 50k for the default settings), and raykd / plain throughput at each V
(target >= 0.9).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from raykd.config import ModelConfig, TrainConfig
from raykd.core import models, sampled_losses
from raykd.training import loop
from raykd.training.spec import RunSpec

BATCH, LEN, NEG = 256, 50, 512


def windows(num_items: int, steps: int) -> list[dict]:
    g = np.random.default_rng(0)
    return [{"input": g.integers(1, num_items + 1, (BATCH, LEN)), "target": g.integers(1, num_items + 1, (BATCH, LEN))}
            for _ in range(steps)]


def desc_of(num_items: int) -> dict:
    return {"family": "sasrec", "num_items": num_items, "dim": 64, "layers": 2, "heads": 2, "max_len": LEN,
            "dropout": 0.2}


def raykd_step(num_items: int, batches: list[dict], sparse: bool) -> float:
    """Seconds a step of raykd's own loop (after the warm-up)."""
    train = TrainConfig(loss="sampled", num_negatives=NEG, sparse_table=sparse, lr=1e-3)
    spec = RunSpec("teacher", ModelConfig(dim=64, layers=2, heads=2, max_len=LEN), train, seed=0)
    desc = desc_of(num_items)
    torch.manual_seed(0)
    model = models.build_model(desc)
    if loop.sparse_table(spec, desc):
        model.item_emb.sparse = True
    optimizer = loop.make_optimizer(model, train, 1)
    loss = loop.make_loss(spec, torch.zeros(num_items + 1), sparse=isinstance(optimizer, loop.TableAndRest))
    amp = torch.autocast("cpu", enabled=False)
    loop.train_epoch(model, model, optimizer, batches[:2], loss, False, "cpu", amp)
    start = time.perf_counter()
    loop.train_epoch(model, model, optimizer, batches[2:], loss, False, "cpu", amp)
    return (time.perf_counter() - start) / (len(batches) - 2)


def plain_step(num_items: int, batches: list[dict]) -> float:
    """Seconds a step of a plain PyTorch loop: the same model and loss, dense Adam."""
    torch.manual_seed(0)
    model = models.build_model(desc_of(num_items))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    log_q = torch.zeros(num_items + 1)
    model.train()
    start = None
    for i, b in enumerate(batches):
        if i == 2:
            start = time.perf_counter()
        inp, target = torch.as_tensor(b["input"]), torch.as_tensor(b["target"])
        hidden = model(inp)
        value = sampled_losses.sampled_softmax_loss(hidden.reshape(-1, 64), model.item_table(), target.reshape(-1),
                                                    NEG, log_q)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
    return (time.perf_counter() - start) / (len(batches) - 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, nargs="*", default=[50_000, 1_000_000])
    ap.add_argument("--steps", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"SASRec 64x2, {BATCH} windows x {LEN} positions a step, {NEG} shared negatives, 1 thread, "
          f"{args.steps} steps after 2 warm-up steps")
    rows = []
    for v in args.items:
        batches = windows(v, args.steps + 2)
        row = {"V": v, "plain": plain_step(v, batches), "dense": raykd_step(v, batches, False),
               "sparse": raykd_step(v, batches, True)}
        rows.append(row)
        print(f"V={v:>9,}: " + ", ".join(f"{k} {1000 * row[k]:.0f} ms ({BATCH / row[k]:,.0f} windows/s)"
                                         for k in ("plain", "dense", "sparse")), flush=True)
    base = rows[0]
    print(f"\n{'V':>9} {'step vs V=' + format(base['V'], ','):>16}   {'raykd / plain throughput':>26}")
    for row in rows:
        growth = ", ".join(f"{k} {row[k] / base[k]:.2f}x" for k in ("plain", "dense", "sparse"))
        ratio = ", ".join(f"{k} {row['plain'] / row[k]:.2f}x" for k in ("dense", "sparse"))
        print(f"{row['V']:>9,} {growth}   {ratio}")


if __name__ == "__main__":
    main()
