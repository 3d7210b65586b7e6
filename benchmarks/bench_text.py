"""Does a text-fused teacher help, and does the help reach the student? (issue 7)

    python benchmarks/bench_text.py --config configs/ml100k.yaml --seeds 0,1,2 \\
        --id-workdir bench_out/quality/ml100k

Two variants of the same pipeline, each over the seeds, each seed in its own `raykd pipeline`
process (benchmarks/bench_quality.py's runner, one after the other):

    id     the config as it is (id-only teacher); with --id-workdir, the runs already there
           (bench_quality's, same config, seeds and overrides) are reused instead of re-run
    text   the same with teacher.item_text=true: embed-items encodes the item text (for
           MovieLens, u.item titles and genres) with the packaged all-MiniLM-L6-v2 and the
           teacher adds a learned projection of the frozen vector to each item embedding

Then, for every seed and variant, the test ranks of teacher, student and student_nokd (full
ranking, leave-one-out, history excluded: raykd.core.metrics, as `raykd evaluate`), NDCG@10 overall
and by the popularity of the test item (its training interactions, in terciles of the test
targets: each bucket holds about a third of the users). Prints the mean over seeds and the paired
text − id difference per model and bucket (mean and standard error over seeds); writes
WORKDIR/summary.{md,json}. Tune is switched off in both variants (it does not change the teacher);
student_nokd, which never sees a teacher, is trained once (id variant) and shown for both.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import run_seed

from raykd.core import metrics, models, sequences

MODELS = ("teacher", "student", "student_nokd")
BUCKETS = ("rare", "mid", "popular")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--workdir", default=None, help="default: bench_out/text/<config name>")
    ap.add_argument("--id-workdir", default=None, help="reuse id-only runs from here (seed<S>/ folders)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides for both variants")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    workdir = Path(args.workdir or Path("bench_out") / "text" / Path(args.config).stem)
    dirs = {"id": Path(args.id_workdir) if args.id_workdir else workdir / "id", "text": workdir / "text"}
    # student_nokd never sees the teacher: the text variant reuses the id variant's
    extra = {"id": [], "text": ["teacher.item_text=true", "distill.train_nokd=false"]}
    for variant, base in dirs.items():
        base.mkdir(parents=True, exist_ok=True)
        for s in seeds:
            if not (base / f"seed{s}" / "report.json").exists():
                run_seed(args.config, s, base, ["tune.enabled=false", *args.overrides, *extra[variant]])
    per_seed = {v: {s: bucket_ndcg(dirs[v] / f"seed{s}", dirs["id"] / f"seed{s}") for s in seeds} for v in dirs}
    summary = summarise(per_seed, seeds)
    summary.update({"config": args.config, "overrides": args.overrides, "seeds": seeds,
                    "runs": {v: str(d) for v, d in dirs.items()}})
    text = markdown(summary)
    print(text)
    (workdir / "summary.md").write_text(text)
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    return 0


def bucket_ndcg(run_dir: Path, id_run: Path) -> dict:
    """NDCG@10 per model: overall and by the test item's popularity tercile."""
    data_dir = run_dir / "data"
    split = sequences.read_split(data_dir)
    hist, targets, seen = sequences.eval_inputs(split, "test")
    counts = pq.read_table(data_dir / "items.parquet", columns=["count"])["count"].to_numpy()
    pop = counts[np.asarray(targets) - 1]  # items.parquet row i holds dense item i + 1
    edges = np.quantile(pop, [1 / 3, 2 / 3])
    bucket = np.digitize(pop, edges, right=True)  # 0: <= q1/3, 1: <= q2/3, 2: above
    out = {"edges": [float(e) for e in edges], "users": {b: int((bucket == i).sum()) for i, b in enumerate(BUCKETS)}}
    for name in MODELS:
        folder = run_dir / name if (run_dir / name / "model.json").exists() else id_run / name
        model, _ = models.load_model(folder)
        _, ranks = metrics.evaluate_model(model, hist, targets, seen, return_ranks=True)
        gain = np.where(ranks < 10, 1.0 / np.log2(ranks + 2.0), 0.0)
        out[name] = {"all": float(gain.mean()), **{b: float(gain[bucket == i].mean()) for i, b in enumerate(BUCKETS)}}
    return out


def summarise(per_seed: dict, seeds: list[int]) -> dict:
    cols = ("all", *BUCKETS)
    table = {}
    for name in MODELS:
        for col in cols:
            ids = [per_seed["id"][s][name][col] for s in seeds]
            txt = [per_seed["text"][s][name][col] for s in seeds]
            diffs = [t - i for t, i in zip(txt, ids, strict=True)]
            se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
            table[f"{name}/{col}"] = {"id": statistics.fmean(ids), "text": statistics.fmean(txt),
                                      "diff": statistics.fmean(diffs), "diff_se": se, "diffs": diffs}
    first = per_seed["id"][seeds[0]]
    return {"table": table, "bucket_edges": first["edges"], "bucket_users": first["users"], "per_seed": per_seed}


def markdown(summary: dict) -> str:
    e = summary["bucket_edges"]
    lines = [(f"Test NDCG@10, mean of seeds {summary['seeds']}; buckets by the test item's training interactions: "
             f"rare <= {e[0]:g} < mid <= {e[1]:g} < popular (users: {summary['bucket_users']})"), "",
             "| model | bucket | id-only teacher | text teacher | text − id (± s.e.) |", "|---|---|---|---|---|"]
    for key, row in summary["table"].items():
        name, col = key.split("/")
        lines.append(f"| {name} | {col} | {row['id']:.4f} | {row['text']:.4f} | "
                     f"{row['diff']:+.4f} ± {row['diff_se']:.4f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
