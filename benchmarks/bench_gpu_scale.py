"""The scale work on one GPU (issue 23 item 6): blocked soft labels and the training step at 1M items.

    python benchmarks/bench_gpu_scale.py                  # on cuda: 1M items; a few minutes on one H100
    python benchmarks/bench_gpu_scale.py --device cpu --items 20000 --positions 512 --steps 2 --tiles 128x8192
                                                          # the CPU twin (tests/test_bench_gpu_scale.py runs it)

No Ray: it imports raykd.core and raykd.training only (torch, numpy, pydantic), so it runs on a lent
GPU machine without Ray installed. Everything runs in this process, side by side:

1. Soft labels: `raykd.core.soft_targets.top_k_and_rest` (what a soft-label actor runs) of --positions
   teacher hidden states (D 64) against --items items, top-K 100, fp32, for each tile shape of --tiles
   (positions x items; the CPU default is 128x8192, a GPU wants larger ones). Printed: seconds,
   positions/s, GFLOP/s (2·P·V·D) and its share of the floor, torch.mm of [4096, 64] x [64, 65536]
   repeated over the same FLOP count; peak device memory (torch.cuda.max_memory_allocated, or the
   process's ru_maxrss on CPU). The tiled result is checked against one [P, V] matrix on the first
   rows.
2. The training step of SASRec 64 x 2 at --items items: raykd's own step (`loop.train_epoch` with
   `make_optimizer` and `make_loss`, bf16 autocast on cuda as the runner uses), `loss: full` (the
   whole catalogue's logits, --full-batch windows a step: [positions, V] logits do not fit at 256)
   against `loss: sampled` (512 log-Q negatives, --batch windows). Printed: ms a step, windows/s, and
   how many times more a window costs under the full softmax.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from raykd.config import ModelConfig, TrainConfig
from raykd.core import models, soft_targets
from raykd.training import loop
from raykd.training.spec import RunSpec

DIM, TOP_K, LEN = 64, 100, 50


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, device: torch.device) -> float:
    fn()  # warm-up (kernels, allocator)
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def mm_floor(device: torch.device, flops: float) -> float:
    """GFLOP/s of torch.mm on [4096, D] x [D, 65536] (the soft labels' product, in large tiles)."""
    a, b = torch.randn(4096, DIM, device=device), torch.randn(DIM, 65536, device=device)
    reps = max(1, round(flops / (2 * 4096 * 65536 * DIM)))
    seconds = timed(lambda: [a @ b for _ in range(reps)], device)
    return 2 * 4096 * 65536 * DIM * reps / seconds / 1e9


def soft_labels(args, device: torch.device) -> None:
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(args.positions, DIM, device=device, generator=g)
    table = torch.randn(args.items + 1, DIM, device=device, generator=g) * 0.1
    flops = 2 * args.positions * (args.items + 1) * DIM
    floor = mm_floor(device, flops)
    print(f"soft labels: {args.positions:,} positions x {args.items:,} items, D {DIM}, top-{TOP_K}, fp32 on {device}; "
          f"floor torch.mm {floor:,.0f} GFLOP/s")
    check = hidden[:64]
    scores = check @ table.T
    scores[:, 0] = float("-inf")
    want = torch.topk(scores, TOP_K, dim=1)
    want_rest = scores.scatter(1, want.indices, float("-inf")).logsumexp(1)
    for tile in args.tiles:
        rows, items = (int(x) for x in tile.split("x"))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds = timed(lambda r=rows, i=items: soft_targets.top_k_and_rest([hidden], [table], TOP_K, r, i), device)
        values, _, rest = soft_targets.top_k_and_rest([check], [table], TOP_K, rows, items)
        assert torch.allclose(values, want.values, atol=1e-4) and torch.allclose(rest, want_rest, atol=1e-3), tile
        gflops = flops / seconds / 1e9
        print(f"  tiles {tile:>11}: {seconds:8.2f} s, {args.positions / seconds:>10,.0f} positions/s, "
              f"{gflops:>7,.0f} GFLOP/s = {100 * gflops / floor:4.0f}% of the floor, peak {peak_mib(device):,.0f} MiB",
              flush=True)


def step_ms(args, device: torch.device, loss_name: str, batch: int) -> float:
    """ms a step of raykd's loop: SASRec 64 x 2, `batch` windows of LEN positions."""
    train = TrainConfig(loss=loss_name, num_negatives=512, lr=1e-3)
    spec = RunSpec("teacher", ModelConfig(dim=DIM, layers=2, heads=2, max_len=LEN), train, seed=0)
    desc = {"family": "sasrec", "num_items": args.items, "dim": DIM, "layers": 2, "heads": 2, "max_len": LEN,
            "dropout": 0.2}
    torch.manual_seed(0)
    model = models.build_model(desc)
    if loop.sparse_table(spec, desc):
        model.item_emb.sparse = True
    model.to(device)
    optimizer = loop.make_optimizer(model, train, 1)
    loss = loop.make_loss(spec, torch.zeros(args.items + 1, device=device),
                          sparse=isinstance(optimizer, loop.TableAndRest))
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
           else torch.autocast("cpu", enabled=False))
    rng = np.random.default_rng(0)
    batches = [{"input": rng.integers(1, args.items + 1, (batch, LEN)),
                "target": rng.integers(1, args.items + 1, (batch, LEN))} for _ in range(args.steps + 1)]
    loop.train_epoch(model, model, optimizer, batches[:1], loss, False, device, amp)  # warm-up
    sync(device)
    start = time.perf_counter()
    loop.train_epoch(model, model, optimizer, batches[1:], loss, False, device, amp)
    sync(device)
    return 1000 * (time.perf_counter() - start) / args.steps


def steps(args, device: torch.device) -> None:
    sampled = step_ms(args, device, "sampled", args.batch)
    full = step_ms(args, device, "full", args.full_batch)
    per_window = (full / args.full_batch) / (sampled / args.batch)
    print(f"training step, SASRec 64x2, {args.items:,} items, {LEN} positions a window, on {device}:")
    print(f"  sampled (512 negatives): {sampled:8.1f} ms a step of {args.batch} windows, "
          f"{1000 * args.batch / sampled:,.0f} windows/s")
    print(f"  full softmax:            {full:8.1f} ms a step of {args.full_batch} windows, "
          f"{1000 * args.full_batch / full:,.0f} windows/s")
    print(f"  a window costs {per_window:.1f}x more under the full softmax", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--positions", type=int, default=50_000, help="soft labels: teacher positions scored")
    p.add_argument("--tiles", nargs="+", default=["128x8192", "1024x65536", "4096x65536", "8192x131072"],
                   help="soft labels: tile shapes, positions x items")
    p.add_argument("--batch", type=int, default=256, help="windows a sampled step")
    p.add_argument("--full-batch", type=int, default=32, help="windows a full-softmax step")
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    soft_labels(args, device)
    steps(args, device)


if __name__ == "__main__":
    main()
