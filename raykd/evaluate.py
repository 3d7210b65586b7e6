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

from raykd import distill, metrics, models, sequences
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
        m["params"] = models.count_params(model)
        m["latency_ms_256"] = metrics.scoring_latency_ms(model, desc["max_len"], desc["num_items"])
        train_info = _read_json(run_dir / name / "metrics.json")
        m["valid_ndcg@10"] = train_info.get("valid", {}).get("ndcg@10")
        m["best_epoch"] = train_info.get("best_epoch")
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
        plot_kd_curve(curve, report.get("teacher"), run_dir / "kd_curve.png")
    if "student" in ranks and "student_nokd" in ranks:
        report["student"]["paired_vs_nokd_rare"] = paired_ndcg(ranks["student"][rare], ranks["student_nokd"][rare])
    report["rare_targets"] = {"max_train_count": RARE_MAX_COUNT, "users": int(rare.sum())}
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


def plot_kd_curve(curve: list[dict], teacher: dict | None, path: Path) -> None:
    """NDCG@10 against parameters for KD students, no-KD twins and the teacher (error bars: s.e.)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    params = [p["params"] for p in curve]
    for key, label in (("kd", "KD student"), ("nokd", "no-KD twin")):
        ndcg = [p[key]["ndcg@10"] for p in curve]
        err = [p[key]["ndcg@10_stderr"] for p in curve]  # standard error of the mean over users
        ax.errorbar(params, ndcg, yerr=err, marker="o", capsize=3, label=label)
    if teacher:
        ax.errorbar([teacher["params"]], [teacher["ndcg@10"]], marker="*", markersize=12, linestyle="none",
                    label="teacher")
    for p in curve:
        ax.annotate(f"d{p['dim']}", (p["params"], p["kd"]["ndcg@10"]), textcoords="offset points", xytext=(4, 4))
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("test NDCG@10")
    ax.set_title("KD gain across student sizes")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    for name in ("popularity", "teacher", "teacher_ensemble", "student", "student_nokd", "tune_best"):
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
    r = report.get("student", {}).get("paired_vs_nokd_rare")
    if r and r["users"]:
        lines.append(f"rare targets (seen <= {RARE_MAX_COUNT} times in training, {r['users']:,} users): "
                     f"{r['mean_diff']:+.4f} ± {r['stderr']:.4f}")
    if report.get("kd_curve"):
        lines += ["\n## KD curve (kd_curve.png)\n",
                  "| width | params | KD NDCG@10 | no-KD NDCG@10 | KD / no-KD | paired diff ± s.e. | rare paired diff ± s.e. |",
                  "|---|---|---|---|---|---|---|"]
        for c in report["kd_curve"]:
            kd, no, pd, pr = c["kd"]["ndcg@10"], c["nokd"]["ndcg@10"], c["paired"], c["rare"]["paired"]
            rare = f"{pr['mean_diff']:+.4f} ± {pr['stderr']:.4f}" if pr["users"] > 1 else "no rare targets"
            lines.append(f"| {c['dim']} | {c['params']:,} | {kd:.4f} | {no:.4f} | {kd / no if no else float('nan'):.3f} | "
                         f"{pd['mean_diff']:+.4f} ± {pd['stderr']:.4f} | {rare} |")
    return "\n".join(lines) + "\n"
