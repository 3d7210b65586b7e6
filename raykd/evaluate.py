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

from raykd import distill, metrics, models, report_md, sequences
from raykd.config import Config
from raykd.errors import RaykdError
from raykd.teacher import member_dirs

MODELS = ("teacher", "student", "student_nokd", "tune/best")
RARE_MAX_COUNT = 5  # the rare-item bucket: test targets seen at most this often in training


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
        m["params"], m["dim"] = models.count_params(model), desc["dim"]
        m["latency_ms_256"] = metrics.scoring_latency_ms(model, desc["max_len"], desc["num_items"])
        train_info = _read_json(run_dir / name / "metrics.json")
        m["valid_ndcg@10"] = train_info.get("valid", {}).get("ndcg@10")
        m["best_epoch"], m["epochs_run"] = train_info.get("best_epoch"), train_info.get("epochs_run")
        m["history"] = [{"epoch": h["epoch"], "ndcg@10": h["ndcg@10"]} for h in train_info.get("history", [])]
        report[name.replace("/", "_")] = m
    members = member_dirs(cfg)
    if len(members) > 1 and all((d / "model.json").exists() for d in members):
        ens = models.Ensemble([models.load_model(d)[0] for d in members])
        m = metrics.evaluate_model(ens, hist, targets, seen)
        report["teacher_ensemble"] = {**m, "params": models.count_params(ens), "members": len(members)}
    if not loaded:
        raise RaykdError(f"no trained models in {run_dir}: run `raykd teacher` / `raykd distill` first")
    _compare(report, ranks, loaded, hist, seen)
    rare = np.concatenate([[0], counts])[np.asarray(targets)] <= RARE_MAX_COUNT
    curve = kd_curve([(w, distill.curve_dir(cfg, w)) for w in cfg.distill.sizes], hist, targets, seen, rare)
    if curve:
        report["kd_curve"] = curve
    if "student" in ranks and "student_nokd" in ranks:
        report["student"]["paired_vs_nokd_rare"] = paired_ndcg(ranks["student"][rare], ranks["student_nokd"][rare])
    report["rare_targets"] = {"max_train_count": RARE_MAX_COUNT, "users": int(rare.sum())}
    report["meta"] = report_md.metadata(cfg)
    report["warnings"] = report_md.warnings(report)
    report["plots"] = report_md.plots(report, run_dir)
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    (run_dir / "report.md").write_text(report_md.markdown(report))
    print(report_md.markdown(report), flush=True)
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
    if not len(diff):  # e.g. a rare-item bucket that no test target falls in
        return {"mean_diff": None, "stderr": None, "users": 0}
    se = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else float("nan")
    return {"mean_diff": float(diff.mean()), "stderr": se, "users": len(diff)}


def kd_curve(pairs: list[tuple[int, Path]], hist, targets, seen, rare: np.ndarray) -> list[dict]:
    """KD student vs its no-KD twin at each width of `distill.sizes` (paired over the same users)."""
    curve = []
    for width, folder in pairs:
        if not (folder / "student" / "model.json").exists() or not (folder / "student_nokd" / "model.json").exists():
            raise RaykdError(f"distill.sizes has width {width} but {folder} lacks a trained pair: run `raykd distill CONFIG`")
        point, ranks = {"dim": width}, {}
        for name, key in (("student", "kd"), ("student_nokd", "nokd")):
            model, _ = models.load_model(folder / name)
            point[key], ranks[key] = metrics.evaluate_model(model, hist, targets, seen, return_ranks=True)
            per_user = np.where(ranks[key] < 10, 1 / np.log2(ranks[key] + 2.0), 0.0)
            point[key]["ndcg@10_stderr"] = float(per_user.std(ddof=1) / math.sqrt(len(per_user))) if len(per_user) > 1 else 0.0
            point["params"] = models.count_params(model)
        point["paired"] = paired_ndcg(ranks["kd"], ranks["nokd"])
        point["rare"] = {"users": int(rare.sum()), "paired": paired_ndcg(ranks["kd"][rare], ranks["nokd"][rare])}
        for key in ("kd", "nokd"):
            r = ranks[key][rare]
            point["rare"][key] = {"ndcg@10": float(np.where(r < 10, 1 / np.log2(r + 2.0), 0).mean()) if len(r) else None}
        curve.append(point)
    return curve


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
