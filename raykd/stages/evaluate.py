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
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray
import torch
from torch import nn

from raykd.cluster import tracking
from raykd.config import Config
from raykd.core import console, metrics, models, rundir, scoring, sequences, staleness
from raykd.core.errors import RaykdError
from raykd.stages import report_md
from raykd.training import plan

MODELS = (rundir.TEACHER, rundir.STUDENT, rundir.STUDENT_NOKD, rundir.TUNE_BEST)
AGREES = (rundir.STUDENT, rundir.STUDENT_NOKD, rundir.TUNE_BEST)  # top-10 agreement with the teacher
RARE_MAX_COUNT = 5  # the rare-item bucket: test targets seen at most this often in training
BLOCK_USERS = 4096  # users per Ray Data task of the test scoring
AGREE_USERS = 2048  # the first users, whose top-10 lists are compared with the teacher's
POPULARITY, ENSEMBLE = "popularity", "teacher_ensemble"
AWARE, AGREE = "|repeat_aware", "agree|"  # keys of test_ranks' columns


class Popularity(nn.Module):
    """Most-popular baseline: every user gets the training interaction counts as scores."""

    def __init__(self, counts: np.ndarray, max_len: int = 1):
        super().__init__()
        scores = torch.as_tensor(np.concatenate([[-np.inf], counts]), dtype=torch.float32)
        self.scores = nn.Parameter(scores, requires_grad=False)
        self.max_len = max_len

    def last_scores(self, seq: torch.Tensor) -> torch.Tensor:
        return self.scores.expand(len(seq), -1)

    def target_ranks(self, targets: np.ndarray, seen: list | None, exclude_target: bool) -> np.ndarray:
        """metrics.target_ranks of these scores (same ties, padding and exclusion rules), counted
        from the sorted counts instead of a [users, items] score matrix:

            rank_u = |{j >= 1 : c_j >= c_y}| - 1 - |{j in E_u, j not in {0, y} : c_j >= c_y}|
        """
        c = self.scores.detach().numpy()  # float32, c[0] = -inf: never a candidate
        targets = np.asarray(targets, dtype=np.int64)
        c_y = c[targets]
        ranks = len(c) - 1 - np.searchsorted(np.sort(c[1:]), c_y, side="left") - 1
        miss = targets == 0
        if seen is not None and len(targets):
            owner = np.repeat(np.arange(len(targets)), [len(h) for h in seen])
            items = np.concatenate([np.asarray(h, dtype=np.int64) for h in seen]) if len(owner) else owner
            owner, items = np.divmod(np.unique(owner * len(c) + items), len(c))  # each seen item once a user
            counted = (items != 0) & (items != targets[owner]) & (c[items] >= c_y[owner])
            ranks = ranks - np.bincount(owner[counted], minlength=len(targets))
            if exclude_target:
                miss[owner[(items == targets[owner]) & (items != 0)]] = True
        return np.where(miss, metrics.MISS_RANK, ranks).astype(np.int64)


def run(cfg: Config) -> dict:
    root = Path(cfg.output_dir)
    rundir.require(root, rundir.DATA, "evaluate")
    data_dir = root / rundir.DATA
    counts = pq.read_table(data_dir / rundir.ITEMS, columns=["count"])["count"].to_numpy()
    exclude = cfg.serve.exclude_seen
    current, skipped = _current(root)
    if not current:
        raise RaykdError(f"no trained models of this config in {root}: run `raykd teacher CONFIG` and "
                         "`raykd distill CONFIG` first (or `raykd pipeline CONFIG`)")
    pairs = [(w, plan.curve_pair(cfg, w)) for w in cfg.distill.sizes]
    _check_pairs(root, pairs)
    members = [rundir.member(i) for i in range(cfg.teacher.ensemble)]
    ensemble = len(members) > 1 and all(rundir.current(root, m) for m in members)
    dirs = {name: [str(root / name)] for name in [*current, *(n for _, pair in pairs for n in pair)]}
    if ensemble:
        dirs[ENSEMBLE] = [str(root / m) for m in members]
    aware = exclude and any_repeats(data_dir)
    ranks = test_ranks(data_dir, dirs, exclude, current if aware else [], cfg.evaluate.num_workers)
    repeats = ranks["repeat"]
    report = {"dataset": json.loads((data_dir / "stats.json").read_text()),
              "protocol": {"exclude_seen": exclude, "repeat_targets": int(repeats.sum()),
                           "repeat_share": float(repeats.mean()) if len(repeats) else 0.0},
              "popularity": summary(ranks[POPULARITY])}
    for name in current:
        report[name.replace("/", "_")] = _model_entry(root, name, ranks, aware)
    for name, why in skipped.items():
        console.say(f"evaluate: not reporting {name}/: {why}")
    if skipped:
        report["skipped"] = skipped
    if ensemble:
        ens = models.Ensemble([models.load_model(root / m)[0] for m in members])
        report[ENSEMBLE] = {**summary(ranks[ENSEMBLE]), "params": models.count_params(ens),
                            "bytes": models.count_bytes(ens), "members": len(members)}
    _compare(report, ranks)
    rare = np.concatenate([[0], counts])[ranks["target"]] <= RARE_MAX_COUNT
    curve = kd_curve(root, pairs, ranks, rare)
    if curve:
        report["kd_curve"] = curve
    if "student" in ranks and "student_nokd" in ranks:
        report["student"]["paired_vs_nokd_rare"] = paired_ndcg(ranks["student"][rare], ranks["student_nokd"][rare])
    report["rare_targets"] = {"max_train_count": RARE_MAX_COUNT, "users": int(rare.sum())}
    report["meta"] = report_md.metadata(cfg)
    report["warnings"] = report_md.warnings(report)
    report["plots"] = report_md.plots(report, root)
    scored = [*current, *(n for _, pair in pairs for n in pair), *(members if ensemble else [])]
    report["models"] = staleness.model_keys(root, scored)  # what later stages compare (staleness.mark_stale)
    (root / rundir.REPORT_JSON).write_text(json.dumps(report, indent=2))
    (root / rundir.REPORT_MD).write_text(report_md.markdown(report))
    if console.level() >= console.VERBOSE:
        console.say(report_md.markdown(report))
    else:
        console.say(report_md.console_summary(report, root))
    tracking.log_report(cfg, root, report)
    return report


def _current(root: Path) -> tuple[list[str], dict[str, str]]:
    """The models of MODELS this config made (current), and why the others on disk are not scored."""
    current, skipped = [], {}
    for name in MODELS:
        if rundir.current(root, name) is not None:
            current.append(name)
        elif (root / name).exists():  # on disk but not from this config, or made from older inputs
            skipped[name] = rundir.stale_reason(root, name)
    return current, skipped


def _model_entry(root: Path, name: str, ranks: dict, aware: bool) -> dict:
    model, desc = models.load_model(root / name)
    m = summary(ranks[name])
    if aware:  # what the endpoint answers with exclude_seen=false
        m["repeat_aware"] = summary(ranks[name + AWARE])
    m["params"], m["bytes"], m["dim"] = models.count_params(model), models.count_bytes(model), desc["dim"]
    m["latency_ms_256"] = metrics.scoring_latency_ms(model, desc["max_len"], desc["num_items"])
    train_info = _read_json(root / name / rundir.METRICS)
    m["valid_ndcg@10"] = train_info.get("valid", {}).get("ndcg@10")
    m["best_epoch"], m["epochs_run"] = train_info.get("best_epoch"), train_info.get("epochs_run")
    m["history"] = [{"epoch": h["epoch"], "ndcg@10": h["ndcg@10"]} for h in train_info.get("history", [])]
    return m


def summary(ranks: np.ndarray) -> dict:
    """What metrics.evaluate_model reports, from the ranks."""
    return {**metrics.ranking_metrics(ranks), "users": len(ranks)}


class Protocol:
    """How test targets are scored: the rule the endpoint applies (`serve.exclude_seen`).

    With exclusion, every history item leaves the candidates, and a target that repeats one is a
    miss (the endpoint can never return it); without, every item is a candidate.
    """

    def __init__(self, seen: list | None, exclude: bool):
        self.seen, self.exclude = seen, exclude

    def ranks(self, model: nn.Module, hist: list, targets: np.ndarray) -> np.ndarray:
        """Each user's 0-based test rank under `model` (metrics.target_ranks' rules)."""
        if isinstance(model, Popularity):
            return model.target_ranks(targets, self.seen, self.exclude)
        return metrics.evaluate_model(model, hist, targets, self.seen, return_ranks=True,
                                      exclude_target=self.exclude)[1]


def _compare(report: dict, ranks: dict) -> None:
    """Student vs teacher (share kept, size, speed, top-10 agreement) and vs student_nokd (paired)."""
    teacher = report.get("teacher")
    for name in AGREES:
        key = name.replace("/", "_")
        if key not in report:
            continue
        if teacher:
            s = report[key]
            s["ndcg_kept_vs_teacher"] = s["ndcg@10"] / teacher["ndcg@10"] if teacher["ndcg@10"] else None
            s["params_vs_teacher"] = s["params"] / teacher["params"]
            s["bytes_vs_teacher"] = s["bytes"] / teacher["bytes"]
            s["latency_vs_teacher"] = s["latency_ms_256"] / teacher["latency_ms_256"]
            s["top10_agreement_with_teacher"] = float(np.nanmean(ranks[AGREE + name]))
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


def _check_pairs(root: Path, pairs: list[tuple[int | str, tuple[str, str]]]) -> None:
    for width, names in pairs:
        stale = [n for n in names if rundir.current(root, n) is None]
        if stale:
            raise RaykdError(f"distill.sizes has {width} but {rundir.stale_reason(root, stale[0])}: "
                             "run `raykd distill CONFIG`")


def kd_curve(root: Path, pairs: list[tuple[int | str, tuple[str, str]]], ranks: dict, rare: np.ndarray) -> list[dict]:
    """KD student vs its no-KD twin at each size of `distill.sizes` (paired over the same users): each
    point's `size` label (`d8`, `pq4`), `dim`, `table` (dense or pq), `params` and `bytes`."""
    curve = []
    for width, (kd_name, nokd_name) in pairs:
        point = {"size": width if isinstance(width, str) else f"d{width}"}
        for name, key in ((kd_name, "kd"), (nokd_name, "nokd")):
            point[key] = summary(ranks[name])
            per_user = np.where(ranks[name] < 10, 1 / np.log2(ranks[name] + 2.0), 0.0)
            point[key]["ndcg@10_stderr"] = float(per_user.std(ddof=1) / math.sqrt(len(per_user))) if len(per_user) > 1 else 0.0
            model, desc = models.load_model(root / name)
            point["dim"], point["table"] = desc["dim"], (desc.get("item_table") or {}).get("kind", "dense")
            point["params"], point["bytes"] = models.count_params(model), models.count_bytes(model)
        kd, nokd = ranks[kd_name], ranks[nokd_name]
        point["paired"] = paired_ndcg(kd, nokd)
        point["rare"] = {"users": int(rare.sum()), "paired": paired_ndcg(kd[rare], nokd[rare])}
        for key, r in (("kd", kd[rare]), ("nokd", nokd[rare])):
            point["rare"][key] = {"ndcg@10": float(np.where(r < 10, 1 / np.log2(r + 2.0), 0).mean()) if len(r) else None}
        curve.append(point)
    return curve


# ---------------------------------------------------------------- test ranks, on Ray Data actors


def any_repeats(data_dir: Path) -> bool:
    """Whether some user's test item is already in their history (train + valid), a shard at a time."""
    for path in sequences.shard_paths(data_dir):
        t = pq.read_table(path, columns=["train", "valid", "test"])
        train = t["train"].combine_chunks()
        owner = np.repeat(np.arange(len(train)), train.value_lengths().to_numpy())
        test = t["test"].to_numpy()
        if (train.values.to_numpy() == test[owner]).any() or (t["valid"].to_numpy() == test).any():
            return True
    return False


def test_ranks(data_dir: Path, dirs: dict[str, list[str]], exclude: bool, aware: list[str], workers: int,
               block_users: int = BLOCK_USERS) -> dict:
    """Every user's test rank under every model in `dirs` (and the popularity baseline), in user
    order: {"target", "repeat", name: ranks, name + AWARE: ranks with nothing excluded (the models
    `aware`), AGREE + student: top-10 overlap with the teacher (the first AGREE_USERS users, else NaN)}.

    Blocks of `block_users` users go to `workers` Ray Data actors, each loading every model once and
    reading only its blocks' histories; the driver gathers the ranks alone (a few bytes a user)."""
    total = sequences.num_users(data_dir)
    blocks = [{"first": a, "stop": min(a + block_users, total)} for a in range(0, total, block_users)]
    ds = ray.data.from_items(blocks, override_num_blocks=len(blocks)).map_batches(
        TestRanks, fn_constructor_kwargs={"data_dir": str(data_dir), "dirs": dirs, "exclude": exclude,
                                          "aware": aware},
        compute=ray.data.ActorPoolStrategy(size=max(1, min(workers, len(blocks)))),
        batch_size=1, num_cpus=1, batch_format="numpy")
    parts, done, t0, throttle = [], 0, time.perf_counter(), console.Throttle(10.0)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        parts.append(batch)
        done += len(batch["user"])
        if throttle.due() and done < total:
            console.say(console.progress("evaluate", done, total, t0, "users"))
    cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(cat.pop("user"), kind="stable")
    return {k: v[order] for k, v in cat.items()}


class TestRanks:
    """Ray Data actor: loads every model once; for each block of users, their test ranks (the
    Protocol of `serve.exclude_seen`), the repeat-aware ranks and the students' top-10 agreement."""

    def __init__(self, data_dir: str, dirs: dict[str, list[str]], exclude: bool, aware: list[str]):
        counts = pq.read_table(Path(data_dir) / rundir.ITEMS, columns=["count"])["count"].to_numpy()
        self.models = {POPULARITY: Popularity(counts)} | {name: _load(paths) for name, paths in dirs.items()}
        self.data_dir, self.exclude, self.aware = Path(data_dir), exclude, aware

    def __call__(self, batch: dict) -> dict:
        first, stop = int(batch["first"][0]), int(batch["stop"][0])
        split = sequences.read_split(self.data_dir, np.arange(first, stop))
        hist, targets, seen = sequences.eval_inputs(split, "test")
        protocol = Protocol(seen if self.exclude else None, self.exclude)
        out = {"user": np.arange(first, stop), "target": np.asarray(targets, np.int64),
               "repeat": np.fromiter((t in set(h.tolist()) for h, t in zip(hist, targets)), bool, len(targets))}
        for name, model in self.models.items():
            out[name] = protocol.ranks(model, hist, targets)
            if name in self.aware:
                out[name + AWARE] = Protocol(None, False).ranks(model, hist, targets)
        agree = min(stop, AGREE_USERS) - first
        if "teacher" in self.models:
            for name in (n for n in AGREES if n in self.models):
                out[AGREE + name] = np.full(stop - first, np.nan)
                if agree > 0:
                    out[AGREE + name][:agree] = _overlap(self.models["teacher"], self.models[name],
                                                         hist[:agree], seen[:agree])
        return out


def _load(paths: list[str]) -> nn.Module:
    nets = [models.load_model(p)[0] for p in paths]
    return nets[0] if len(nets) == 1 else models.Ensemble(nets)


def _overlap(teacher: nn.Module, student: nn.Module, hist: list, seen: list, k: int = 10) -> np.ndarray:
    """Per user, |top-k(teacher) ∩ top-k(student)| / k over the items outside `seen` (blocked exact
    top-k: no [users, items] matrix)."""
    tops = []
    for net in (teacher, student):
        seq = models.left_pad(hist, net.max_len)
        with torch.no_grad():
            scores = scoring.dot_scores(net, seq) or scoring.FullScores(net.last_scores(seq))
            tops.append(scoring.blocked_top_k(scores, k, seen, on_block=_no_nan)[1])
    a, b = tops
    return (a.unsqueeze(2) == b.unsqueeze(1)).any(2).sum(1).double().numpy() / k


def _no_nan(start: int, window: torch.Tensor) -> None:
    torch.nan_to_num_(window, nan=-torch.inf)  # a NaN score ranks last, as in metrics.topk_overlap


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
