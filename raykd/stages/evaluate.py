"""evaluate: test metrics for every trained model, in one report.

Reads `<run>/data/` and each model the run record lists as current (`teacher/`, `student/`,
`student_nokd/`, `tune/best/`, the KD curve's pairs; raykd.core.rundir): a folder left by an earlier
config, or made from data prepared again since, is named in the report and never scored. Writes
`<run>/report.json` and `<run>/report.md`. Protocol (GUIDE.md section 2): leave-one-out, full
ranking over the catalogue; test is read here only, once per final model; checkpoints were chosen
on validation during training. Seen items follow `serve.exclude_seen`, the rule the endpoint
applies: with it (the default) every history item is excluded and a test target that repeats one
is a miss, so report.json scores exactly what is served; the repeat-aware variant (nothing
excluded) is reported beside it whenever such repeats exist.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import nn

from raykd.cluster import tracking
from raykd.config import Config
from raykd.core import console, metrics, models, rundir, sequences, staleness
from raykd.core.errors import RaykdError
from raykd.stages import report_md
from raykd.training import plan

MODELS = (rundir.TEACHER, rundir.STUDENT, rundir.STUDENT_NOKD, rundir.TUNE_BEST)
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
    root = Path(cfg.output_dir)
    rundir.require(root, rundir.DATA, "evaluate")
    data_dir = root / rundir.DATA
    split = sequences.read_split(data_dir)
    hist, targets, seen = sequences.eval_inputs(split, "test")
    counts = pq.read_table(data_dir / rundir.ITEMS, columns=["count"])["count"].to_numpy()
    exclude = cfg.serve.exclude_seen
    protocol = Protocol(seen if exclude else None, exclude)
    repeats = np.fromiter((t in set(h.tolist()) for h, t in zip(hist, targets)), bool, len(targets))
    report = {"dataset": json.loads((data_dir / "stats.json").read_text()),
              "protocol": {"exclude_seen": exclude, "repeat_targets": int(repeats.sum()),
                           "repeat_share": float(repeats.mean()) if len(repeats) else 0.0}}
    report["popularity"] = protocol.score(Popularity(counts), hist, targets)[0]
    ranks, loaded, skipped = {}, {}, {}
    for name in MODELS:
        if rundir.current(root, name) is None:
            if (root / name).exists():  # on disk but not from this config, or made from older inputs
                skipped[name] = rundir.stale_reason(root, name)
            continue
        model, desc = models.load_model(root / name)
        loaded[name] = model
        m, ranks[name] = protocol.score(model, hist, targets)
        if exclude and repeats.any():  # what the endpoint answers with exclude_seen=false
            m["repeat_aware"] = metrics.evaluate_model(model, hist, targets, None)
        m["params"], m["bytes"], m["dim"] = models.count_params(model), models.count_bytes(model), desc["dim"]
        m["latency_ms_256"] = metrics.scoring_latency_ms(model, desc["max_len"], desc["num_items"])
        train_info = _read_json(root / name / rundir.METRICS)
        m["valid_ndcg@10"] = train_info.get("valid", {}).get("ndcg@10")
        m["best_epoch"], m["epochs_run"] = train_info.get("best_epoch"), train_info.get("epochs_run")
        m["history"] = [{"epoch": h["epoch"], "ndcg@10": h["ndcg@10"]} for h in train_info.get("history", [])]
        report[name.replace("/", "_")] = m
    for name, why in skipped.items():
        console.say(f"evaluate: not reporting {name}/: {why}")
    if skipped:
        report["skipped"] = skipped
    members = [rundir.member(i) for i in range(cfg.teacher.ensemble)]
    if len(members) > 1 and all(rundir.current(root, m) for m in members):
        ens = models.Ensemble([models.load_model(root / m)[0] for m in members])
        m = protocol.score(ens, hist, targets)[0]
        report["teacher_ensemble"] = {**m, "params": models.count_params(ens), "bytes": models.count_bytes(ens),
                                      "members": len(members)}
    if not loaded:
        raise RaykdError(f"no trained models of this config in {root}: run `raykd teacher CONFIG` and "
                         "`raykd distill CONFIG` first (or `raykd pipeline CONFIG`)")
    _compare(report, ranks, loaded, hist, seen)
    rare = np.concatenate([[0], counts])[np.asarray(targets)] <= RARE_MAX_COUNT
    pairs = [(w, plan.curve_pair(cfg, w)) for w in cfg.distill.sizes]
    curve = kd_curve(root, pairs, protocol, hist, targets, rare)
    if curve:
        report["kd_curve"] = curve
    if "student" in ranks and "student_nokd" in ranks:
        report["student"]["paired_vs_nokd_rare"] = paired_ndcg(ranks["student"][rare], ranks["student_nokd"][rare])
    report["rare_targets"] = {"max_train_count": RARE_MAX_COUNT, "users": int(rare.sum())}
    report["meta"] = report_md.metadata(cfg)
    report["warnings"] = report_md.warnings(report)
    report["plots"] = report_md.plots(report, root)
    scored = [*loaded, *(n for _, pair in pairs for n in pair), *(members if "teacher_ensemble" in report else [])]
    report["models"] = staleness.model_keys(root, scored)  # what later stages compare (staleness.mark_stale)
    (root / rundir.REPORT_JSON).write_text(json.dumps(report, indent=2))
    (root / rundir.REPORT_MD).write_text(report_md.markdown(report))
    if console.level() >= console.VERBOSE:
        console.say(report_md.markdown(report))
    else:
        console.say(report_md.console_summary(report, root))
    tracking.log_report(cfg, root, report)
    return report


class Protocol:
    """How test targets are scored: the rule the endpoint applies (`serve.exclude_seen`).

    With exclusion, every history item leaves the candidates, and a target that repeats one is a
    miss (the endpoint can never return it); without, every item is a candidate.
    """

    def __init__(self, seen: list | None, exclude: bool):
        self.seen, self.exclude = seen, exclude

    def score(self, model, hist, targets) -> tuple[dict, np.ndarray]:
        return metrics.evaluate_model(model, hist, targets, self.seen, return_ranks=True,
                                      exclude_target=self.exclude)


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
            s["bytes_vs_teacher"] = s["bytes"] / teacher["bytes"]
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


def kd_curve(root: Path, pairs: list[tuple[int | str, tuple[str, str]]], protocol: Protocol, hist, targets,
             rare: np.ndarray) -> list[dict]:
    """KD student vs its no-KD twin at each size of `distill.sizes` (paired over the same users): each
    point's `size` label (`d8`, `pq4`), `dim`, `table` (dense or pq), `params` and `bytes`."""
    curve = []
    for width, (kd_name, nokd_name) in pairs:
        stale = [n for n in (kd_name, nokd_name) if rundir.current(root, n) is None]
        if stale:
            raise RaykdError(f"distill.sizes has {width} but {rundir.stale_reason(root, stale[0])}: "
                             "run `raykd distill CONFIG`")
        point, ranks = {"size": width if isinstance(width, str) else f"d{width}"}, {}
        for name, key in ((kd_name, "kd"), (nokd_name, "nokd")):
            model, desc = models.load_model(root / name)
            point["dim"], point["table"] = desc["dim"], (desc.get("item_table") or {}).get("kind", "dense")
            point[key], ranks[key] = protocol.score(model, hist, targets)
            per_user = np.where(ranks[key] < 10, 1 / np.log2(ranks[key] + 2.0), 0.0)
            point[key]["ndcg@10_stderr"] = float(per_user.std(ddof=1) / math.sqrt(len(per_user))) if len(per_user) > 1 else 0.0
            point["params"], point["bytes"] = models.count_params(model), models.count_bytes(model)
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
