"""The scale grid: every stage of configs/scale.yaml on synthetic logs of N interactions x V items (issue 23).

    python benchmarks/bench_scale.py --grid 1M:50k,1M:200k,3M:100k
    python benchmarks/bench_scale.py --grid 300k:50k --stages prepare,teacher      # a minute's sample

For each cell a seeded `raykd synth` log (about 20 interactions a user: users = N / 20) goes through
`raykd prepare`, `teacher`, `soft-labels`, `distill`, `evaluate` and `recommend` with the scale
recipe (one epoch each for teacher and student, no no-KD twin), each stage its own CLI process whose
whole process tree is sampled from outside every second. Printed per stage: wall seconds, throughput
(interactions/s, windows/s, positions/s, users/s), peak memory of the process tree (summed PSS, so
Ray's shared object store counts once) and of its largest single process, bytes per interaction,
and the longest silence of its console. Then the fitted growth of each figure with N (fixed V) and
with V (fixed N), as the exponent b of figure ~ N^b.

Side by side in the same run, this machine's floors: a pyarrow read of the same log (ingest), a
plain PyTorch loop of the teacher's step (same model, same sampled softmax, no Ray), sgemm GFLOP/s
(the work of soft labels, evaluate and recommend) and memory bandwidth.
Cells too long for a session can be given fewer stages (--stages) and their rates extrapolated:
the stage's own rate line says how many positions or users it covered.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

GIB = 2**30
STAGES = ("prepare", "teacher", "soft-labels", "distill", "evaluate", "recommend")
RECIPE = ["teacher.train.epochs=1", "distill.train.epochs=1", "distill.train_nokd=false"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grid", default="1M:50k,1M:200k,3M:100k", help="cells N:V (K/M suffixes)")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--out", default="bench_out/scale")
    ap.add_argument("--config", default="configs/scale.yaml")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"machine: {platform.node()}, {os.cpu_count()} cores, torch {torch.__version__}; load average at start "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    floors = machine_floors()
    print("floors: " + ", ".join(f"{k} {v:,.1f}" for k, v in floors.items()), flush=True)
    results = []
    for cell in args.grid.split(","):
        n, v = (parse_size(x) for x in cell.split(":"))
        log = synth(out, n, v)
        row = {"N": n, "V": v, "ingest_rows_s": pyarrow_read_rate(log)}
        for stage in args.stages.split(","):
            row[stage] = run_stage(stage, log, out / f"run-{cell.replace(':', '-')}", args.config)
            print(json.dumps({"cell": cell, "stage": stage, **row[stage]}), flush=True)
        row["plain_step_windows_s"] = plain_step_rate(out / f"run-{cell.replace(':', '-')}")
        results.append(row)
    report(results, floors, args.stages.split(","))
    return 0


def parse_size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1_000, "M": 1_000_000}.get(text[-1], 1)
    return int(float(text.rstrip("KM")) * scale)


def synth(out: Path, n: int, v: int) -> Path:
    path = out / f"synth-{n}-{v}.parquet"
    if not path.exists():
        subprocess.run(["raykd", "synth", "--users", str(n // 20), "--items", str(v), "--mean-length", "20",
                        "--seed", "11", "--out", str(path)], check=True, stdout=subprocess.DEVNULL)
    return path


# ---------------------------------------------------------------- one stage, watched from outside


def run_stage(stage: str, log: Path, run: Path, config: str) -> dict:
    """Run `raykd STAGE` on the cell; its wall time, peaks, silences and the stage's own rate."""
    overrides = [f"data.path={log}", f"output_dir={run}", *RECIPE]
    if stage == "recommend":
        cmd = ["raykd", "recommend", str(run), "--out", str(run / "recommendations.parquet"), "--workers", "2"]
    else:
        cmd = ["raykd", stage, config, *overrides]
    watched = watch(cmd)
    watched |= stage_rate(stage, run, watched.pop("lines"), watched["seconds"])
    return watched


SAMPLE_S = 1.0  # between memory samples
# Reading one Ray process's PSS costs ~17 ms of kernel time (its smaps walk ~10 GB of mappings), a
# tree of ~15 processes ~0.25 s: a sampler at nice 0 every 0.5 s took 17-67 % of a core from the Ray
# workers it measured (they run at nice 15). So it samples every second, at nice 19.


def watch(cmd: list[str]) -> dict:
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    peak = {"tree": 0, "one": 0}
    lines, gaps, last = [], [0.0], [time.perf_counter()]

    def sample() -> None:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # this thread only (Linux)
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                sizes = []
                for p in [root, *root.children(recursive=True)]:
                    try:
                        sizes.append(p.memory_full_info().pss)
                    except psutil.Error:
                        pass
                peak["tree"], peak["one"] = max(peak["tree"], sum(sizes)), max(peak["one"], max(sizes, default=0))
            except psutil.Error:
                pass
            time.sleep(SAMPLE_S)

    threading.Thread(target=sample, daemon=True).start()
    for line in proc.stdout:
        now = time.perf_counter()
        gaps.append(now - last[0])
        last[0] = now
        lines.append(line.rstrip())
    proc.wait()
    gaps.append(time.perf_counter() - last[0])
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n" + "\n".join(lines[-20:]))
    return {"seconds": time.perf_counter() - t0, "peak_tree_gib": peak["tree"] / GIB,
            "peak_one_gib": peak["one"] / GIB, "longest_silence_s": max(gaps), "lines": lines}


def stage_rate(stage: str, run: Path, lines: list[str], seconds: float) -> dict:
    """The stage's own throughput, from what it wrote (manifest, metrics) or said."""
    stats = json.loads((run / "data" / "stats.json").read_text()) if (run / "data").exists() else {}
    n = stats.get("interactions", 0)
    rate: dict = {}
    if stage == "prepare":
        rate["interactions_s"] = n / seconds
    elif stage in ("teacher", "distill"):
        metrics = json.loads((run / ("teacher" if stage == "teacher" else "student") / "metrics.json").read_text())
        epoch_s = metrics["history"][0]["seconds"]
        rate["windows_s"] = windows(run) / epoch_s
        rate["epoch_s"] = epoch_s
    elif stage == "soft-labels":
        manifest = json.loads((run / "soft_labels" / "manifest.json").read_text())
        rate["positions_s"] = manifest["rows_per_s"]
    elif stage in ("evaluate", "recommend"):
        rate["users_s"] = stats.get("users", 0) / seconds
    said = [x for x in lines if re.search(r"windows/s|positions|users/s", x)]
    rate["last_rate_line"] = said[-1][-120:] if said else ""
    return rate


def windows(run: Path) -> int:
    max_len = json.loads((run / "teacher" / "model.json").read_text())["max_len"]
    total = 0
    for shard in sorted((run / "data" / "sequences").glob("part-*.parquet")):
        lengths = pq.read_table(shard, columns=["train"])["train"].combine_chunks().value_lengths().to_numpy()
        total += int((-(-np.maximum(lengths - 1, 0) // max_len)).sum())
    return total


# ---------------------------------------------------------------- floors


def machine_floors() -> dict:
    a = torch.randn(2048, 2048)
    out = {}
    for threads in (1, os.cpu_count() or 1):
        torch.set_num_threads(threads)
        a @ a
        t = time.perf_counter()
        for _ in range(3):
            a @ a
        out[f"sgemm_gflops_{threads}t"] = 3 * 2 * 2048**3 / (time.perf_counter() - t) / 1e9
    big = torch.empty(128 * 2**20)  # 512 MiB
    dst = torch.empty_like(big)
    dst.copy_(big)
    t = time.perf_counter()
    for _ in range(5):
        dst.copy_(big)
    out["memory_gb_s"] = 5 * 2 * big.numel() * 4 / (time.perf_counter() - t) / 1e9  # read + write
    return out


def pyarrow_read_rate(log: Path) -> float:
    t = time.perf_counter()
    rows = pq.read_table(log).num_rows
    return rows / (time.perf_counter() - t)


def plain_step_rate(run: Path, steps: int = 20) -> float:
    """The teacher's step (forward, sampled softmax over 512 log-Q negatives, backward, Adam) in a plain
    PyTorch loop on one thread (a Ray worker's share): windows/s, the floor of `windows_s`."""
    from raykd.core import models, sampled_losses

    if not (run / "teacher").exists():
        return math.nan
    torch.set_num_threads(1)
    desc = json.loads((run / "teacher" / "model.json").read_text())
    model = models.build_model(desc)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    counts = pq.read_table(run / "data" / "items.parquet", columns=["count"])["count"].to_numpy().astype(np.float64)
    log_q = torch.tensor(np.log(np.concatenate([[1e-12], counts]) / counts.sum()), dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(1, desc["num_items"] + 1, (256, desc["max_len"]), generator=g)
    target = torch.randint(1, desc["num_items"] + 1, (256, desc["max_len"]), generator=g)
    t = None
    for step in range(steps + 2):
        if step == 2:
            t = time.perf_counter()
        hidden = model(seq)
        loss = sampled_losses.sampled_softmax_loss(hidden.reshape(-1, hidden.shape[-1]), model.item_table(),
                                                   target.reshape(-1), 512, log_q)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * 256 / (time.perf_counter() - t)


# ---------------------------------------------------------------- the table and the fits


def report(results: list[dict], floors: dict, stages: list[str]) -> None:
    print("\n| N | V | stage | wall s | rate | peak tree GiB | peak one GiB | bytes/interaction | longest silence s |")
    print("|---:|---:|---|---:|---|---:|---:|---:|---:|")
    for r in results:
        for stage in stages:
            s = r[stage]
            rate = next((f"{s[k]:,.0f} {k[:-2]}/s" for k in ("interactions_s", "windows_s", "positions_s", "users_s")
                         if k in s), "")
            per = s["peak_tree_gib"] * GIB / r["N"]
            print(f"| {r['N']:,} | {r['V']:,} | {stage} | {s['seconds']:.0f} | {rate} | {s['peak_tree_gib']:.2f} | "
                  f"{s['peak_one_gib']:.2f} | {per:.0f} | {s['longest_silence_s']:.0f} |")
        ingest = r["ingest_rows_s"]
        print(f"| {r['N']:,} | {r['V']:,} | floors | | pyarrow read {ingest:,.0f} rows/s; plain teacher step "
              f"{r['plain_step_windows_s']:,.0f} windows/s | | | | |")
    print("\nfloors of this machine: " + ", ".join(f"{k} {v:,.1f}" for k, v in floors.items()))
    for stage in stages:
        for fixed, vary in (("V", "N"), ("N", "V")):
            groups = {}
            for r in results:
                groups.setdefault(r[fixed], []).append(r)
            for key, rows in groups.items():
                if len(rows) < 2:
                    continue
                x = np.log([r[vary] for r in rows])
                for fig in ("seconds", "peak_tree_gib", "peak_one_gib"):
                    b = np.polyfit(x, np.log([max(r[stage][fig], 1e-9) for r in rows]), 1)[0]
                    print(f"growth {stage} {fig} ~ {vary}^{b:.2f} at {fixed} = {key:,}")


if __name__ == "__main__":
    sys.exit(main())
