"""Does distillation pay? Teachers (id-only, text) and students of several widths, KD vs no-KD.

    raykd prepare configs/beauty.yaml output_dir=runs/kd_beauty
    raykd embed-items configs/beauty.yaml output_dir=runs/kd_beauty
    python benchmarks/bench_kd.py --run runs/kd_beauty --seeds 0,1,2 --sizes 8,4,pq64c4,pq40c2
    python benchmarks/bench_kd.py --run runs/kd_beauty --seeds 0,1,2 --sizes 8,4,pq64c4,pq40c2 --report-only \
        --compare pq64c4:8 pq40c2:4   # the tables

`--run` is a run directory that `raykd prepare` and `raykd embed-items` already filled (data/ and
item_text/). `--sizes` names the students: an integer is a dense SASRec of that width x 1 block;
`pq<D>c<C>` a D-wide x 1 block SASRec whose item table is product-quantised, C uint8 codes per
item over 256-row codebooks (raykd.core.item_tables; the KD student's codes from `--pq-assign`,
its no-KD twin's always teacher-free: `--twin-assign`, svd of the train interactions by default
(raykd.training.plan.teacher_free) or k-means over the item text vectors).
Sizes are every element a model reads at inference (models.count_params). Seeds and sizes can run as separate processes (`--threads 1` each) into the same
run directory; `--report-only` then summarises whatever has finished. Every model is trained in this process with raykd's
own Ray-free loop (`raykd.training.loop.fit_local`: the same step, epoch, validation and early stopping as
the Ray Train stages) and saved under `<run>/bench_kd/seed<N>/`, so an interrupted benchmark
resumes where it stopped. Per seed: each teacher, its soft labels (top-K + rest log-mass), then per
width a KD student and its no-KD twin (same size, budget and seed). Protocol (README, "Evaluation protocol"):
leave-one-out, full ranking, history excluded, checkpoints chosen on validation, test read once
per final model, paired differences over users; the rare bucket is test targets seen <= 5 times
in training.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from raykd.config import INIT_STD, ItemTableConfig, ModelConfig, TrainConfig
from raykd.core import metrics, models, sequences
from raykd.stages import soft_labels
from raykd.stages.evaluate import paired_ndcg
from raykd.training import loop
from raykd.training.plan import teacher_free
from raykd.training.spec import KD, ItemText, RunSpec

TEACHERS = {  # name -> (uses text, text_mode)
    "id": (False, None),
    "text": (True, "both"),
}


def train_cfg(epochs: int, lr: float, patience: int, min_epochs: int, batch: int = 128) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=batch, lr=lr, weight_decay=0.0, patience=patience,
                       min_epochs=min_epochs, loss="full", num_negatives=1000)


def model_cfg(dim: int, layers: int, heads: int, dropout: float, max_len: int = 50) -> ModelConfig:
    return ModelConfig(family="sasrec", dim=dim, layers=layers, heads=heads, max_len=max_len, dropout=dropout)


REPORT_ONLY = False  # --report-only: summarise what is trained, train nothing


class NotTrained(Exception):
    pass


def trained(out: Path, spec: RunSpec, data_dir: Path) -> dict:
    """Train (or reuse) one model; save it with its summary to `out`."""
    if (out / "summary.json").exists():
        return json.loads((out / "summary.json").read_text())
    if REPORT_ONLY:
        raise NotTrained(out)
    t0 = time.perf_counter()
    model, summary = loop.fit_local(spec, data_dir, log=lambda m: print("  " + m, flush=True))
    summary["seconds"] = time.perf_counter() - t0
    models.save_model(out, model, loop.model_desc(spec, data_dir))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def score_soft(teacher_dirs: list[Path], data_dir: Path, out: Path, top_k: int) -> None:
    """The soft-label stage's scorer and writer, in this process (several teachers: an ensemble)."""
    if (out / "done").exists():
        return
    soft_labels.score_here(teacher_dirs, data_dir, out, top_k)
    (out / "done").write_text("1")


def test_eval(model_dir: Path, split: dict, rare: np.ndarray) -> tuple[dict, np.ndarray]:
    model, _ = models.load_model(model_dir)
    hist, targets, seen = sequences.eval_inputs(split, "test")
    m, ranks = metrics.evaluate_model(model, hist, targets, seen, return_ranks=True)
    m["params"], m["bytes"] = models.count_params(model), models.count_bytes(model)  # read at inference
    m["rare_ndcg@10"] = float(np.where(ranks[rare] < 10, 1 / np.log2(ranks[rare] + 2.0), 0).mean())
    return m, ranks


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run dir with data/ and item_text/")
    p.add_argument("--seeds", default="0")
    p.add_argument("--sizes", "--widths", dest="sizes", default="4,8,16,32",
                   help="students: dense widths (8) and PQ tables (pq64c4: 64 wide, 4 codes per item)")
    p.add_argument("--pq-assign", default="teacher", choices=["teacher", "text", "svd"],
                   help="where a PQ KD student's codes come from")
    p.add_argument("--twin-assign", default="", choices=["", "text", "svd"],
                   help="a PQ no-KD twin's codes, always teacher-free: svd or text (default: the KD student's "
                   "when teacher-free, else svd, as raykd.training.plan.teacher_free)")
    p.add_argument("--compare", nargs="*", default=[], metavar="A:B",
                   help="after training, the KD students of sizes A and B paired over users, per seed")
    p.add_argument("--teachers", default="id,text")
    p.add_argument("--kd-teacher", default="text", help="the teacher the students distil from: id, text, ens "
                   "(the seed's id and text teachers as one ensemble) or ens_id (the id teachers of seeds 0-2)")
    p.add_argument("--teacher-dim", type=int, default=64)
    p.add_argument("--teacher-epochs", type=int, default=25)
    p.add_argument("--student-epochs", type=int, default=40)
    p.add_argument("--kd-loss", default="kl_full")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--transfer", type=int, default=1, help="1: KD students start from the teacher's items")
    p.add_argument("--top-k", type=int, default=100)
    p.add_argument("--tag", default="", help="suffix for the KD students' folders (variants)")
    p.add_argument("--students", default="nokd,kd", help="which of each width's pair this process trains "
                   "(nokd: the twin alone, so two processes can train a pair side by side)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--report-only", action="store_true", help="summarise the models already trained; train none")
    args = p.parse_args()
    global REPORT_ONLY
    REPORT_ONLY = args.report_only
    if args.threads:
        torch.set_num_threads(args.threads)
    run = Path(args.run)
    data_dir = run / "data"
    text_path = run / "item_text" / "vectors.parquet"
    split = sequences.read_split(data_dir)
    counts = pq.read_table(data_dir / "items.parquet", columns=["count"])["count"].to_numpy()
    rare = np.concatenate([[0], counts])[split["test"]] <= 5
    n_items = sequences.num_items(data_dir)
    print(f"bench_kd: {len(split['user']):,} users, {n_items:,} items, rare test targets {rare.mean():.1%}; "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads", flush=True)
    results = {"args": vars(args), "seeds": {}}
    for seed in [int(s) for s in args.seeds.split(",")]:
        base = run / "bench_kd" / f"seed{seed}"
        res = results["seeds"][seed] = {"teachers": {}, "students": {}}
        ranks = {}
        for name in [t for t in args.teachers.split(",") if t]:
            use_text, mode = TEACHERS[name]
            text = ItemText(text_path, mode, INIT_STD) if use_text else None
            spec = RunSpec(f"teacher_{name}", model_cfg(args.teacher_dim, 2, 2, 0.3), train_cfg(args.teacher_epochs,
                           1e-3, 5, 10), seed, text=text)
            try:
                s = trained(base / f"teacher_{name}", spec, data_dir)
            except NotTrained:
                print(f"seed {seed} teacher {name}: not trained yet; skipped", flush=True)
                continue
            m, ranks[f"teacher_{name}"] = test_eval(base / f"teacher_{name}", split, rare)
            res["teachers"][name] = {"test": m, "valid": s["valid"]["ndcg@10"], "best_epoch": s["best_epoch"]}
            print(f"seed {seed} teacher {name}: valid {s['valid']['ndcg@10']:.4f} test {m['ndcg@10']:.4f} "
                  f"(rare {m['rare_ndcg@10']:.4f}), best epoch {s['best_epoch']}, {s.get('seconds', 0):.0f}s",
                  flush=True)
        if "teacher_id" in ranks and "teacher_text" in ranks:
            res["text_vs_id"] = paired_ndcg(ranks["teacher_text"], ranks["teacher_id"])
            print(f"seed {seed} text − id teacher paired: {res['text_vs_id']}", flush=True)
        sizes = [w for w in args.sizes.split(",") if w]
        tdirs, soft_dir = kd_teachers(args.kd_teacher, run / "bench_kd", base, args.top_k)
        if sizes and "kd" in args.students.split(",") and not (REPORT_ONLY and not (soft_dir / "done").exists()):
            score_soft(tdirs, data_dir, soft_dir, args.top_k)
        for size in sizes:
            try:
                student_pair(args, seed, size, base, tdirs, soft_dir, data_dir, split, rare, n_items, res)
            except NotTrained as missing:
                print(f"seed {seed} {label(size)}: not trained yet ({missing}); skipped", flush=True)
        for pair in args.compare:
            compare(args, pair, seed, base, split, rare, res)
        (run / "bench_kd" / f"results{args.tag}.json").write_text(json.dumps(results, indent=1, default=str))
    summarise(results)
    return 0


def kd_teachers(kind: str, bench: Path, base: Path, top_k: int) -> tuple[list[Path], Path]:
    """The teacher folders a KD student distils from, and where their soft labels go.

    id, text: this seed's teacher; ens: this seed's id and text teachers; ens_id: the id-only
    teachers of seeds 0, 1, 2 (the no-text recipe, teacher.ensemble 3), shared by every seed.
    """
    if kind == "ens_id":
        return [bench / f"seed{i}" / "teacher_id" for i in range(3)], bench / f"soft_ens_id_k{top_k}"
    names = ("id", "text") if kind == "ens" else (kind,)
    return [base / f"teacher_{t}" for t in names], base / f"soft_{kind}_k{top_k}"


def label(size: str) -> str:
    """A `--sizes` entry's name: d8 for a dense width, the entry itself (pq64c4) for a PQ table."""
    return size if size.startswith("pq") else f"d{int(size)}"


def student_model(size: str, assign: str) -> ModelConfig:
    """The student of a `--sizes` entry: SASRec size x 1 block (dense), or pq<D>c<C> (PQ, `assign` codes)."""
    found = re.fullmatch(r"pq([0-9]+)c([0-9]+)", size)
    if found is None:
        return model_cfg(int(size), 1, 1, 0.2)
    table = ItemTableConfig(codes=int(found[2]), assign=assign)
    return model_cfg(int(found[1]), 1, 1, 0.2).model_copy(update={"item_table": table})


def student_dirs(args, size: str) -> tuple[str, str]:
    """Folder names of a size's KD student and its no-KD twin (a PQ one's name says its codes)."""
    if not size.startswith("pq"):
        return f"kd_{args.kd_teacher}_{label(size)}{args.tag}", f"nokd_{label(size)}"
    twin = twin_model(args, size).item_table.assign
    return f"kd_{args.kd_teacher}_{size}-{args.pq_assign}{args.tag}", f"nokd_{size}-{twin}"


def twin_model(args, size: str) -> ModelConfig:
    """The no-KD twin of a size: the KD student's model with teacher-free codes (`--twin-assign`)."""
    model = teacher_free(student_model(size, args.pq_assign))
    if model.item_table is None or not args.twin_assign:
        return model
    return model.model_copy(update={"item_table": model.item_table.model_copy(update={"assign": args.twin_assign})})


def student_pair(args, seed, size, base, tdirs, soft_dir, data_dir, split, rare, n_items, res) -> None:
    """A KD student and its no-KD twin of one size: train (or reuse), test, compare paired."""
    model, train = student_model(size, args.pq_assign), train_cfg(args.student_epochs, 2e-3, 5, 10)
    todo = args.students.split(",")
    kd_name, nokd_name = student_dirs(args, size)
    settings = KD(soft_dir, args.alpha, args.temperature, args.kd_loss, tuple(tdirs) if args.transfer else (),
                  INIT_STD)
    kd = trained(base / kd_name, RunSpec(kd_name, model, train, seed, kd=settings), data_dir) if "kd" in todo else None
    nokd_dir = base / nokd_name
    if "nokd" not in todo and not (nokd_dir / "summary.json").exists():
        raise NotTrained(nokd_dir)  # another process trains it (--students nokd)
    nokd = trained(nokd_dir, RunSpec(nokd_name, twin_model(args, size), train, seed), data_dir)
    if kd is None:
        return
    m_kd, r_kd = test_eval(base / kd_name, split, rare)
    m_no, r_no = test_eval(nokd_dir, split, rare)
    paired = paired_ndcg(r_kd, r_no)
    paired_rare = paired_ndcg(r_kd[rare], r_no[rare])
    teacher = res["teachers"].get(args.kd_teacher, {}).get("test", {}).get("ndcg@10")
    res["students"][label(size)] = {"kd": m_kd, "nokd": m_no, "paired": paired, "paired_rare": paired_rare,
                                    "valid": {"kd": kd["valid"]["ndcg@10"], "nokd": nokd["valid"]["ndcg@10"]},
                                    "best_epoch": {"kd": kd["best_epoch"], "nokd": nokd["best_epoch"]},
                                    "vs_teacher": m_kd["ndcg@10"] / teacher if teacher else None}
    kept = f"; {m_kd['ndcg@10'] / teacher:.1%} of the teacher" if teacher else ""
    print(f"seed {seed} {label(size)}: KD {m_kd['ndcg@10']:.4f} vs noKD {m_no['ndcg@10']:.4f} "
          f"(x{m_kd['ndcg@10'] / max(m_no['ndcg@10'], 1e-9):.3f}; paired {paired['mean_diff']:+.4f} ± "
          f"{paired['stderr']:.4f}; rare {paired_rare['mean_diff']:+.4f} ± {paired_rare['stderr']:.4f}){kept}; "
          f"valid {kd['valid']['ndcg@10']:.4f}/{nokd['valid']['ndcg@10']:.4f}; size {m_kd['params']:,}",
          flush=True)


def compare(args, pair: str, seed: int, base: Path, split: dict, rare: np.ndarray, res: dict) -> None:
    """`--compare A:B`: the KD students of sizes A and B, paired over users (test), and on validation."""
    a, b = pair.split(":")
    dirs = [base / student_dirs(args, s)[0] for s in (a, b)]
    if not all((d / "summary.json").exists() for d in dirs):
        print(f"seed {seed} {label(a)} vs {label(b)}: not both trained; skipped", flush=True)
        return
    (m_a, r_a), (m_b, r_b) = (test_eval(d, split, rare) for d in dirs)
    valid = [json.loads((d / "summary.json").read_text())["valid"]["ndcg@10"] for d in dirs]
    paired, paired_rare = paired_ndcg(r_a, r_b), paired_ndcg(r_a[rare], r_b[rare])
    res.setdefault("compare", {})[pair] = {"test": [m_a["ndcg@10"], m_b["ndcg@10"]], "valid": valid,
                                           "size": [m_a["params"], m_b["params"]], "paired": paired,
                                           "paired_rare": paired_rare}
    print(f"seed {seed} KD {label(a)} ({m_a['params']:,}) vs KD {label(b)} ({m_b['params']:,}): test "
          f"{m_a['ndcg@10']:.4f} vs {m_b['ndcg@10']:.4f}, paired {paired['mean_diff']:+.4f} ± {paired['stderr']:.4f} "
          f"(rare {paired_rare['mean_diff']:+.4f} ± {paired_rare['stderr']:.4f}); valid {valid[0]:.4f} vs "
          f"{valid[1]:.4f}", flush=True)


def summarise(results: dict) -> None:
    seeds = list(results["seeds"].values())
    print(f"\n== summary over {len(seeds)} seed(s) ==")
    for name in sorted({n for s in seeds for n in s["teachers"]}):
        rows = [s["teachers"][name]["test"] for s in seeds if name in s["teachers"]]
        v = [r["ndcg@10"] for r in rows]
        print(f"teacher {name}: test NDCG@10 {np.mean(v):.4f} ± {np.std(v):.4f} over {len(v)} seed(s) "
              f"(rare {np.mean([r['rare_ndcg@10'] for r in rows]):.4f}); params {rows[0]['params']:,}")
    both = [s for s in seeds if "text_vs_id" in s]
    if both:
        ratio = np.mean([s["teachers"]["text"]["test"]["ndcg@10"] for s in both]) / np.mean(
            [s["teachers"]["id"]["test"]["ndcg@10"] for s in both])
        diffs = ", ".join(f"{s['text_vs_id']['mean_diff']:+.4f} ± {s['text_vs_id']['stderr']:.4f}" for s in both)
        print(f"text / id teacher over {len(both)} seed(s): x{ratio:.3f}; paired diff per seed {diffs}")
    print("| student | size | seeds | KD NDCG@10 | noKD NDCG@10 | KD / noKD | KD / teacher | "
          "paired (mean ± s.e. per seed) | rare paired |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in sorted({w for s in seeds for w in s["students"]}, key=str):
        rows = [s["students"][name] for s in seeds if name in s["students"]]
        kd = np.mean([r["kd"]["ndcg@10"] for r in rows])
        no = np.mean([r["nokd"]["ndcg@10"] for r in rows])
        paired = "; ".join(f"{r['paired']['mean_diff']:+.4f} ± {r['paired']['stderr']:.4f}" for r in rows)
        rare = "; ".join(f"{r['paired_rare']['mean_diff']:+.4f} ± {r['paired_rare']['stderr']:.4f}" for r in rows)
        kept = [r.get("vs_teacher") for r in rows]
        kept = f"{np.mean(kept):.1%}" if all(k is not None for k in kept) else "–"
        print(f"| {name} | {rows[0]['kd']['params']:,} | {len(rows)} | {kd:.4f} | {no:.4f} | "
              f"{kd / no if no else math.nan:.3f} | {kept} | {paired} | {rare} |")
    for pair in sorted({p for s in seeds for p in s.get("compare", {})}):
        rows = [s["compare"][pair] for s in seeds if pair in s.get("compare", {})]
        per_seed = "; ".join(f"{r['paired']['mean_diff']:+.4f} ± {r['paired']['stderr']:.4f}" for r in rows)
        print(f"KD {pair.replace(':', ' vs KD ')} over {len(rows)} seed(s): test {np.mean([r['test'][0] for r in rows]):.4f}"
              f" vs {np.mean([r['test'][1] for r in rows]):.4f}; paired per seed {per_seed}")


if __name__ == "__main__":
    sys.exit(main())
