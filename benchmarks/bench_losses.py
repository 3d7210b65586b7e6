"""What a training step's loss costs over a whole catalogue: cross-entropy, top-K KL, whole-catalogue KL.

    python benchmarks/bench_losses.py                      # Beauty's shape: 12,102 columns, K 100
    python benchmarks/bench_losses.py --items 50000 --rows 800

Forward + backward of `raykd.core.losses.distill_loss` on random logits [rows, items + 1] (one thread,
best of --repeats), side by side in one run:
    ce         alpha 0: cross-entropy alone (what a no-KD twin pays)
    kl         top-K KL + CE
    kl_full    (K + 1)-bin KL + CE, the student's rest mass from the log-softmax CE shares
    kl_full (masked logsumexp)   the same loss with the rest mass summed over a masked copy of
               every logit (how raykd computed it before): the reference the value is checked against
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from raykd.core import losses


def masked_rest_kl_full(s, targets, idx, t_logits, t_rest, alpha, temperature):
    """The reference: r_s as a logsumexp over a masked copy of the logits."""
    ce = losses.cross_entropy(s, targets)
    usable = (idx != 0) & torch.isfinite(t_logits)
    taken = torch.zeros_like(s, dtype=torch.bool).scatter_(1, idx, usable)
    taken[:, 0] = True
    r_s = s.masked_fill(taken, float("-inf")).logsumexp(1)
    kd = losses._kl_with_rest(s.gather(1, idx), r_s, usable, t_logits, t_rest, torch.isfinite(t_rest), temperature,
                              targets != 0)
    return (1 - alpha) * ce + alpha * kd, ce, kd


def timed(fn, s: torch.Tensor, repeats: int) -> tuple[float, float]:
    best, value = float("inf"), 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        total = fn()[0]
        total.backward()
        best = min(best, time.perf_counter() - t0)
        value, s.grad = float(total.detach()), None
    return best, value


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1600, help="training positions per step (batch x max_len)")
    p.add_argument("--items", type=int, default=12101)
    p.add_argument("--top-k", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    s = (2 * torch.randn(args.rows, args.items + 1, generator=gen)).requires_grad_(True)
    targets = torch.randint(1, args.items + 1, (args.rows,), generator=gen)
    idx = torch.stack([torch.randperm(args.items, generator=gen)[:args.top_k] + 1 for _ in range(args.rows)])
    t_logits = torch.randn(args.rows, args.top_k, generator=gen).sort(1, descending=True).values + 3
    t_rest = torch.randn(args.rows, generator=gen) + 4
    kd = (t_logits, 0.5, 1.0)
    runs = {
        "ce": lambda: losses.distill_loss(s, targets, idx, t_logits, 0.0, 1.0, "kl"),
        "kl": lambda: losses.distill_loss(s, targets, idx, *kd, "kl"),
        "kl_full": lambda: losses.distill_loss(s, targets, idx, *kd, "kl_full", teacher_rest=t_rest),
        "kl_full (masked logsumexp)": lambda: masked_rest_kl_full(s, targets, idx, t_logits, t_rest, 0.5, 1.0),
    }
    print(f"bench_losses: {args.rows:,} rows x {args.items + 1:,} columns, K {args.top_k}, 1 thread, "
          f"best of {args.repeats}")
    res = {name: timed(fn, s, args.repeats) for name, fn in runs.items()}
    base = res["ce"][0]
    for name, (sec, value) in res.items():
        print(f"  {name:<28} {sec * 1000:7.1f} ms  {sec / base:5.2f}x ce   loss {value:.6f}")
    ref = res["kl_full (masked logsumexp)"]
    same = abs(res["kl_full"][1] - ref[1]) <= 1e-4 * abs(ref[1])
    print(f"kl_full vs its masked-logsumexp reference: {ref[0] / res['kl_full'][0]:.2f}x faster; "
          f"{'same' if same else 'DIFFERENT'} loss")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
