"""Does a small student cost what it is? Epoch seconds on a large catalogue, teacher vs students.

    python benchmarks/bench_student_epoch.py                        # 24k-item synthetic catalogue
    python benchmarks/bench_student_epoch.py --quality runs/quickstart --seeds 0,1,2 --kd-loss kl,kl_full

Timing (the default): prepares a synthetic log whose catalogue has >= 20k items (`raykd prepare`'s
stage on `raykd.data.synth`, the only Ray work here), then trains in this process, on `--threads`
threads, with `raykd.training.loop.fit_local` (the step, epoch and validation of Ray Train, without Ray):

1. the teacher (128 x 2 by default) with a full softmax (the configs' default `train.loss`) and
   with the sampled softmax;
2. its soft labels (top-100 and rest log-mass), scored in this process by `soft_labels.TeacherScorer`;
3. students (16 x 1, alpha 0.5): full softmax + `kl` (the student before issue 15), sampled softmax +
   `kl` and + `kl_full` (`sampled_losses.sampled_distill_loss`: the teacher's top-K and the target scored
   exactly, the rest of the catalogue estimated from `--kd-negatives` items drawn per position).

An epoch's seconds are fit_local's (training and validation), the median of the epochs after the
first. Printed side by side, with each student's ratio to each teacher and PASS/FAIL for the
target: a 1/8-size student's epoch <= 1/3 of its teacher's.

Quality (`--quality RUN`): a run directory with data/ and soft_labels/ (e.g. after `raykd pipeline
configs/quickstart.yaml`); trains the config's student with a full and a sampled softmax (same
seeds, KD loss, budget) and prints the best val NDCG@10 of each, per seed and on average.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from raykd import stages
from raykd.config import INIT_STD, ModelConfig, TrainConfig, load_config
from raykd.core import models, sequences
from raykd.stages import soft_labels
from raykd.training import loop
from raykd.training.spec import KD, RunSpec

KD_NEGATIVES = TrainConfig.model_fields["kd_negatives"].default


def model_cfg(dim: int, layers: int, heads: int) -> ModelConfig:
    return ModelConfig(family="sasrec", dim=dim, layers=layers, heads=heads, max_len=50, dropout=0.2)


def run_spec(name: str, model: ModelConfig, loss: str, epochs: int, negatives: int, soft_dir: Path | None = None,
             alpha: float = 0.0, kd_loss: str = "kl", seed: int = 0, lr: float = 0.001, batch: int = 128,
             patience: int = 100, kd_negatives: int = KD_NEGATIVES, temperature: float = 1.0) -> RunSpec:
    train = TrainConfig(epochs=epochs, batch_size=batch, lr=lr, patience=patience, loss=loss,
                        num_negatives=negatives, kd_negatives=kd_negatives)
    kd = KD(soft_dir, alpha, temperature, kd_loss, (), INIT_STD) if alpha > 0 else None
    return RunSpec(name, model, train, seed, kd=kd)


def timed(spec: RunSpec, data_dir: Path) -> tuple[torch.nn.Module, dict]:
    t0 = time.perf_counter()
    model, summary = loop.fit_local(spec, data_dir, log=lambda m: print("  " + m, flush=True))
    seconds = [h["seconds"] for h in summary["history"]]
    summary.update(wall_s=time.perf_counter() - t0, epoch_s=statistics.median(seconds[1:] or seconds))
    return model, summary


def score_soft(teacher_dir: Path, data_dir: Path, out: Path, top_k: int) -> float:
    """The soft-label stage's scorer and writer, in this process; returns seconds."""
    t0 = time.perf_counter()
    soft_labels.score_here([teacher_dir], data_dir, out, top_k)
    return time.perf_counter() - t0


def prepare(args) -> Path:
    out = Path(args.out).resolve()
    if not (out / "data" / "stats.json").exists():
        cfg = load_config("configs/quickstart.yaml", [
            f"output_dir={out}", "tune.enabled=false", "ray.num_cpus=2", f"data.synthetic.users={args.users}",
            f"data.synthetic.items={args.items}", f"data.synthetic.mean_length={args.mean_length}",
            "data.synthetic.popularity_skew=0.6", "data.min_item_interactions=1"])
        stages.run(cfg, ["prepare"])
    return out / "data"


def timing(args) -> int:
    data_dir = prepare(args)
    n_items = sequences.num_items(data_dir)
    windows = len(loop.windows_in_memory(data_dir, 50)["input"])
    print(f"bench_student_epoch: {n_items:,} items, {windows:,} windows, {args.threads} thread(s), "
          f"{args.epochs} epochs each, {args.negatives} shared negatives (teacher), {args.kd_negatives} per position "
          "(students)", flush=True)
    t_model, s_model = model_cfg(args.teacher_dim, 2, 2), model_cfg(args.student_dim, 1, 1)
    rows = {}
    teacher_spec = run_spec("teacher_full", t_model, "full", args.epochs, args.negatives)
    teacher, rows["teacher full"] = timed(teacher_spec, data_dir)
    _, rows["teacher sampled"] = timed(run_spec("teacher_sampled", t_model, "sampled", args.epochs, args.negatives),
                                       data_dir)
    out = Path(args.out).resolve()
    models.save_model(out / "teacher", teacher, loop.model_desc(teacher_spec, data_dir))
    soft_s = score_soft(out / "teacher", data_dir, out / "soft_labels", 100)
    for name, loss, kd in (("student full kl", "full", "kl"), ("student sampled kl", "sampled", "kl"),
                           ("student sampled kl_full", "sampled", "kl_full")):
        spec = run_spec(name.replace(" ", "_"), s_model, loss, args.epochs, args.negatives, out / "soft_labels", 0.5,
                        kd, lr=0.003, kd_negatives=args.kd_negatives)
        _, rows[name] = timed(spec, data_dir)
    report(rows, soft_s, n_items, windows, args)
    return 0


def report(rows: dict, soft_s: float, n_items: int, windows: int, args) -> None:
    full, sampled = rows["teacher full"], rows["teacher sampled"]
    print(f"\n{n_items:,} items, {windows:,} windows an epoch, {args.threads} thread(s); soft labels {soft_s:.1f}s\n")
    print("| model | params | epoch s (median after the 1st) | vs teacher full | vs teacher sampled | val NDCG@10 |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['params']:,} | {r['epoch_s']:.2f} | {r['epoch_s'] / full['epoch_s']:.3f} | "
              f"{r['epoch_s'] / sampled['epoch_s']:.3f} | {r['valid']['ndcg@10']:.4f} |")
    size = rows["student sampled kl"]["params"] / full["params"]
    print(f"\nstudent params / teacher params: {size:.3f}")
    for name in ("student sampled kl", "student sampled kl_full"):
        ratio = rows[name]["epoch_s"] / full["epoch_s"]
        print(f"{'PASS' if ratio <= 1 / 3 else 'FAIL'}: {name} epoch / teacher (full softmax) epoch = {ratio:.3f} "
              "(target <= 0.333)")
    before = rows["student full kl"]["epoch_s"] / full["epoch_s"]
    print(f"before: student full kl epoch / teacher epoch = {before:.3f}")
    summary = {name: {k: r[k] for k in ("params", "epoch_s", "wall_s")} | {"val_ndcg@10": r["valid"]["ndcg@10"]}
               for name, r in rows.items()}
    (Path(args.out) / "bench_student_epoch.json").write_text(json.dumps(
        {"items": n_items, "windows": windows, "args": vars(args), "soft_labels_s": soft_s, "rows": summary}, indent=1))


def quality(args) -> int:
    """Best val NDCG@10 of the config's student, full vs sampled softmax, per seed."""
    run = Path(args.quality).resolve()
    cfg = load_config(str(run / "config.yaml"), [f"output_dir={run}"])
    data_dir, soft_dir, d = run / "data", run / "soft_labels", cfg.distill
    kinds = args.kd_loss.split(",") if args.kd_loss else [d.loss]
    print(f"bench_student_epoch --quality: {sequences.num_items(data_dir):,} items, {args.kd_negatives} negatives per position, "
          f"alpha {d.alpha}, T {d.temperature}, KD {kinds}", flush=True)
    results: dict[str, list] = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for kind in kinds:
            for loss in ("full", "sampled"):
                spec = run_spec(f"{loss}_{kind}_s{seed}", d.model, loss, d.train.epochs, args.negatives, soft_dir,
                                d.alpha, kind, seed, d.train.lr, d.train.batch_size, d.train.patience,
                                args.kd_negatives, d.temperature)
                _, s = timed(spec, data_dir)
                results.setdefault(f"{loss} {kind}", []).append((s["valid"]["ndcg@10"], s["epoch_s"], s["best_epoch"]))
    print("\n| student | val NDCG@10 per seed | mean | epoch s (median) |\n|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {', '.join(f'{v[0]:.4f}' for v in r)} | {np.mean([v[0] for v in r]):.4f} | "
              f"{np.median([v[1] for v in r]):.2f} |")
    (run / "bench_student_quality.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_out/student_epoch")
    ap.add_argument("--users", type=int, default=3000)
    ap.add_argument("--items", type=int, default=24000)
    ap.add_argument("--mean-length", type=float, default=25)
    ap.add_argument("--teacher-dim", type=int, default=128)
    ap.add_argument("--student-dim", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--negatives", type=int, default=1000, help="train.num_negatives: shared by a batch (no KD term)")
    ap.add_argument("--kd-negatives", type=int, default=KD_NEGATIVES,
                    help="train.kd_negatives: drawn for each position (sampled loss with a KD term)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quality", default=None, help="run directory: full vs sampled student quality instead")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--kd-loss", default=None, help="KD kinds for --quality, e.g. kl,kl_full (default: config's)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    return quality(args) if args.quality else timing(args)


if __name__ == "__main__":
    sys.exit(main())
