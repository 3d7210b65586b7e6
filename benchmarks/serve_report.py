"""The report of bench_serve.py: one table row per load point as it is measured, then the peak and
paired-round tables and the verdicts on the targets of issue 5 item 4 (throughput ratios checked on
the median of the per-round paired ratios when the paired rounds ran).
"""

import json
import statistics

from serve_load import REQUEST_TIMEOUT_S  # the load generator's per-request timeout (sibling script)

# Targets of issue 5 item 4.
TARGET_P99_MS = 50.0
TARGET_P99_RATE = 100.0
TARGET_VS_CONST = 0.8
TARGET_VS_PLAIN = 1.0
TARGET_VS_TEACHER = 5.0

HEADER = ("| cat   | server              | load          | offered | req/s    | p50 ms  | p95 ms  | p99 ms  | errors |\n"
          "|-------|---------------------|---------------|---------|----------|---------|---------|---------|--------|")


def _fmt(v, width: int, digits: int = 1) -> str:
    if v is None:
        return "-".rjust(width)
    return f"{v:{width}.{digits}f}" if isinstance(v, float) else str(v).rjust(width)


def print_row(cat: str, server: str, r: dict) -> None:
    offered = r.get("offered")
    print(f"| {cat:5} | {server:19} | {r['load']:13} | {_fmt(offered, 7, 0)} | {_fmt(r['throughput'], 8)} | "
          f"{_fmt(r['p50_ms'], 7)} | {_fmt(r['p95_ms'], 7)} | {_fmt(r['p99_ms'], 7)} | "
          f"{_fmt(r['errors'], 6)} |", flush=True)


def _peak(results: list[dict], cat: str, server: str) -> float | None:
    """Best closed-loop throughput with zero errors, one server at a time."""
    vals = [r["throughput"] for r in results if r["catalogue"] == cat and r["server"] == server
            and "clients" in r and r["errors"] == 0]
    return max(vals) if vals else None


def _at_rate(results: list[dict], cat: str, server: str, rate: float) -> dict | None:
    return next((r for r in results if r["catalogue"] == cat and r["server"] == server
                 and r.get("offered") == rate), None)


def _paired_ratio(pair_results: list[dict], cat: str, num: str, den: str) -> tuple[float | None, str]:
    """Median over rounds of num/den measured in the same round, and the per-round values."""
    rounds: dict[int, dict] = {}
    for r in pair_results:
        if r["catalogue"] == cat and r["server"] in (num, den) and r["errors"] == 0:
            rounds.setdefault(r["round"], {})[r["server"]] = r["throughput"]
    vals = [v[num] / v[den] for v in rounds.values() if num in v and den in v and v[den] > 0]
    if not vals:
        return None, ""
    return round(statistics.median(vals), 2), ", ".join(f"{v:.2f}" for v in vals)


def _print_tables(results: list[dict], pair_results: list[dict], catalogues: list[str], servers: list[str],
                  info: dict) -> None:
    """Load averages, peak throughput one server at a time, and the paired rounds' medians."""
    print(f"\n# load average at start: {info['loadavg_start']}\n# load average at end:   {info['loadavg_end']}")
    print("\n## peak throughput, one server at a time (best closed-loop point with zero errors), req/s")
    print("| cat   | " + " | ".join(f"{s:>19}" for s in servers) + " |")
    print("|-------|" + "|".join("-" * 21 for _ in servers) + "|")
    for cat in catalogues:
        print(f"| {cat:5} | " + " | ".join(_fmt(_peak(results, cat, s), 19) for s in servers) + " |")
    pair_servers = list(dict.fromkeys(r["server"] for r in pair_results))
    if pair_results:
        print("\n## paired rounds: median req/s over rounds (min-max)")
        print("| cat   | " + " | ".join(f"{s:>19}" for s in pair_servers) + " |")
        print("|-------|" + "|".join("-" * 21 for _ in pair_servers) + "|")
        for cat in catalogues:
            cells = []
            for server in pair_servers:
                v = [r["throughput"] for r in pair_results if r["catalogue"] == cat and r["server"] == server]
                cells.append(f"{statistics.median(v):.0f} ({min(v):.0f}-{max(v):.0f})".rjust(19) if v else "-".rjust(19))
            print(f"| {cat:5} | " + " | ".join(cells) + " |")


class _Verdicts:
    """Verdicts as they are printed, kept for the JSON output."""

    def __init__(self, results: list[dict], pair_results: list[dict]):
        self.results, self.pair_results, self.rows = results, pair_results, []

    def add(self, name: str, value, target: str, ok: bool | None, detail: str = "") -> None:
        status = "n/a" if ok is None else ("PASS" if ok else "FAIL")
        self.rows.append({"target": name, "value": value, "goal": target, "status": status, "detail": detail})
        print(f"{status:4}  {name}: {value} (target {target}){'  [' + detail + ']' if detail else ''}")

    def ratio(self, cat: str, num: str, den: str, name: str, goal: float | None) -> None:
        """Target checked on the paired median when the paired rounds ran; sequential peaks shown too."""
        pn, pd = _peak(self.results, cat, num), _peak(self.results, cat, den)
        seq = round(pn / pd, 2) if pn and pd else None
        med, per_round = _paired_ratio(self.pair_results, cat, num, den)
        value = med if med is not None else seq
        goal_txt = f">= {goal:g}" if goal is not None else "(info)"
        ok = None if goal is None or value is None else value >= goal
        detail = (f"paired median, rounds {per_round}; " if med is not None else "") + f"one-at-a-time peaks {seq}"
        self.add(f"{cat}: {name}", value, goal_txt, ok, detail)

    def catalogue(self, cat: str, servers: list[str]) -> None:
        """Every verdict of one catalogue: serve-student's errors and p99, the ratios, others' p99."""
        mine = [r for r in self.results if r["catalogue"] == cat and r["server"] == "serve-student"]
        errs = sum(r["errors"] for r in mine)
        kinds: dict[str, int] = {}
        for r in mine:
            for k, v in r["error_kinds"].items():
                kinds[k] = kinds.get(k, 0) + v
        self.add(f"{cat}: serve-student errors, all load points", errs, "0", errs == 0,
                 json.dumps(kinds) if kinds else "")
        r = _at_rate(self.results, cat, "serve-student", TARGET_P99_RATE)
        self.add(f"{cat}: serve-student p99 at {TARGET_P99_RATE:g} req/s offered (ms)", r and r["p99_ms"],
                 f"<= {TARGET_P99_MS:g}", None if r is None or r["p99_ms"] is None else
                 r["p99_ms"] <= TARGET_P99_MS and r["errors"] == 0, f"achieved {r['throughput']} req/s, "
                 f"{r['errors']} errors" if r else "")
        self.ratio(cat, "serve-student", "serve-teacher", "serve-student / serve-teacher throughput",
                   TARGET_VS_TEACHER)
        self.ratio(cat, "serve-student", "serve-const", "serve-student / serve-const throughput",
                   TARGET_VS_CONST if cat == "small" else None)
        self.ratio(cat, "serve-student", "plain-student", "serve-student / plain-student throughput",
                   TARGET_VS_PLAIN if cat == "100k" else None)
        self.ratio(cat, "serve-student", "serve-2hop", "one deployment / ingress->model via handle (serve-2hop)",
                   None)
        self.ratio(cat, "serve-student-1loop", "serve-student", "serve-student-1loop / serve-student", None)
        for server in servers:
            r = _at_rate(self.results, cat, server, TARGET_P99_RATE)
            if r and server != "serve-student":
                self.add(f"{cat}: {server} p99 at {TARGET_P99_RATE:g} req/s offered (ms)", r["p99_ms"], "(info)",
                         None, f"achieved {r['throughput']} req/s, {r['errors']} errors")


def report(results: list[dict], pair_results: list[dict], catalogues: list[str], servers: list[str],
           rates: list[float], info: dict) -> list:
    """Print the summary tables and the verdicts; return the verdicts."""
    _print_tables(results, pair_results, catalogues, servers, info)
    verdicts = _Verdicts(results, pair_results)
    print("\n## ratios and targets (throughput ratios: median of per-round paired ratios when measured)")
    for cat in catalogues:
        verdicts.catalogue(cat, servers)
    everything = results + pair_results
    all_errors = sum(r["errors"] for r in everything)
    server_side = sum(v for r in everything for k, v in r["error_kinds"].items() if k.startswith("http_"))
    verdicts.add("all servers, all points: errors", all_errors, "0", all_errors == 0,
                 f"of which HTTP error statuses: {server_side}; the rest are client-side timeouts "
                 f"({REQUEST_TIMEOUT_S:g} s) or connection failures")
    return verdicts.rows
