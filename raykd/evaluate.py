"""evaluate: test metrics for every trained model, in one report.

Reads `<run>/data/` and each model folder present (`teacher/`, `student/`, `student_nokd/`,
`tune/best/`); writes `<run>/report.json` and `<run>/report.md`. Protocol (GUIDE.md section 2):
leave-one-out, full ranking over the catalogue, the user's history excluded; test is read here
only, once per final model; checkpoints were chosen on validation during training.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import nn

from raykd import metrics, models, sequences
from raykd.config import Config
from raykd.errors import RaykdError

MODELS = ("teacher", "student", "student_nokd", "tune/best")


class Popularity(nn.Module):
    """Most-popular baseline: every user gets the training interaction counts as scores."""

    def __init__(self, counts: np.ndarray, max_len: int = 1):
        super().__init__()
        scores = torch.as_tensor(np.concatenate([[-np.inf], counts]), dtype=torch.float32)
        self.scores = nn.Parameter(scores, requires_grad=False)
        self.max_len = max_len

    def last_scores(self, seq: torch.Tensor) -> torch.Tensor:
        return self.scores.expand(len(seq), -1)


def run(cfg: Config) -> dict:
    run_dir = Path(cfg.output_dir)
    data_dir = run_dir / "data"
    split = sequences.read_split(data_dir)
    hist, targets, seen = sequences.eval_inputs(split, "test")
    counts = pq.read_table(data_dir / "items.parquet", columns=["count"])["count"].to_numpy()
    report = {"dataset": json.loads((data_dir / "stats.json").read_text())}
    report["popularity"] = metrics.evaluate_model(Popularity(counts), hist, targets, seen)
    ranks, loaded = {}, {}
    for name in MODELS:
        if not (run_dir / name / "model.json").exists():
            continue
        model, desc = models.load_model(run_dir / name)
        loaded[name] = model
        m, ranks[name] = metrics.evaluate_model(model, hist, targets, seen, return_ranks=True)
        m["params"] = models.count_params(model)
        m["latency_ms_256"] = metrics.scoring_latency_ms(model, desc["max_len"], desc["num_items"])
        train_info = _read_json(run_dir / name / "metrics.json")
        m["valid_ndcg@10"] = train_info.get("valid", {}).get("ndcg@10")
        m["best_epoch"] = train_info.get("best_epoch")
        report[name.replace("/", "_")] = m
    if not loaded:
        raise RaykdError(f"no trained models in {run_dir}: run `raykd teacher` / `raykd distill` first")
    _compare(report, ranks, loaded, hist, seen)
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    (run_dir / "report.md").write_text(markdown(report))
    print(markdown(report), flush=True)
    return report


def _compare(report: dict, ranks: dict, loaded: dict, hist: list, seen: list) -> None:
    """Student vs teacher (share kept, size, speed, top-10 agreement) and vs student_nokd (paired)."""
    teacher = report.get("teacher")
    for name in ("student", "student_nokd", "tune/best"):
        key = name.replace("/", "_")
        if key not in report:
            continue
        if teacher:
            s = report[key]
            s["ndcg_kept_vs_teacher"] = s["ndcg@10"] / teacher["ndcg@10"] if teacher["ndcg@10"] else None
            s["params_vs_teacher"] = s["params"] / teacher["params"]
            s["latency_vs_teacher"] = s["latency_ms_256"] / teacher["latency_ms_256"]
            s["top10_agreement_with_teacher"] = _agreement(loaded["teacher"], loaded[name], hist, seen)
    if "student" in ranks and "student_nokd" in ranks:
        report["student"]["paired_vs_nokd"] = paired_ndcg(ranks["student"], ranks["student_nokd"])


def paired_ndcg(ranks_a: np.ndarray, ranks_b: np.ndarray, k: int = 10) -> dict:
    """Mean per-user NDCG@k difference a - b with its standard error (same users, paired)."""
    def ndcg(r):
        return np.where(r < k, 1.0 / np.log2(np.asarray(r, dtype=np.float64) + 2), 0.0)

    diff = ndcg(ranks_a) - ndcg(ranks_b)
    se = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else float("nan")
    return {"mean_diff": float(diff.mean()), "stderr": se, "users": len(diff)}


def _agreement(teacher, student, hist, seen, limit: int = 2048) -> float:
    h = models.left_pad(hist[:limit], teacher.max_len)
    hs = models.left_pad(hist[:limit], student.max_len)
    with torch.no_grad():
        a, b = teacher.last_scores(h), student.last_scores(hs)
    return metrics.topk_overlap(a, b, 10, metrics.exclusion_mask(seen[:limit], a.shape[1]))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def markdown(report: dict) -> str:
    d = report["dataset"]
    lines = [(f"# raykd report\n\n{d['users']:,} users, {d['items']:,} items, {d['interactions']:,} "
              "interactions; leave-one-out test, full ranking, history excluded.\n"),
             "| model | NDCG@10 | HR@10 | MRR@10 | params | ms / 256 users | kept vs teacher |",
             "|---|---|---|---|---|---|---|"]
    for name in ("popularity", "teacher", "student", "student_nokd", "tune_best"):
        m = report.get(name)
        if not m:
            continue
        kept = m.get("ndcg_kept_vs_teacher")
        lines.append(f"| {name} | {m['ndcg@10']:.4f} | {m['hr@10']:.4f} | {m['mrr@10']:.4f} | "
                     f"{m.get('params', 0):,} | {m.get('latency_ms_256', 0):.2f} | "
                     f"{'' if kept is None else f'{kept:.1%}'} |")
    p = report.get("student", {}).get("paired_vs_nokd")
    if p:
        lines.append(f"\nstudent − student_nokd NDCG@10 (paired over {p['users']:,} users): "
                     f"{p['mean_diff']:+.4f} ± {p['stderr']:.4f} (standard error)")
    return "\n".join(lines) + "\n"
