"""Streaming ingest of training windows and soft labels against a pyarrow read of the same files (issue 23).

    python benchmarks/bench_ingest.py RUN_DIR                   # a run with data/ and soft_labels/
    python benchmarks/bench_ingest.py RUN_DIR --shards 4 --step-ms 288

What a training run reads each epoch, in one process, one thread, the page cache warm (each path
runs once before it is timed), on the first --shards sequence shards and their soft-label shards:
    floor    pyarrow.parquet.read_table of those files, the columns training reads (`train`;
             `idx`, `logits`, `rest`): bytes and rows decoded, nothing else
    stream   raykd.training.loop.streamed_batches (what the one-task path and Tune trials iterate):
             the same files read a chunk of users at a time, cut into windows, each window's soft
             labels gathered, shuffled in the bounded buffer, batches of --batch windows
Printed: seconds, positions/s of each, stream / floor throughput (target >= 0.8), and the stream's
milliseconds a batch against --step-ms, a training step's own time (bench_step.py measures it: 288 ms
for SASRec 64x2 at 50k items on one thread): the share of a step that reading would take if it were
not overlapped (target: never the bottleneck).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from raykd.core import sequences
from raykd.training import loop


def subset(run: Path, shards: int, into: Path) -> tuple[Path, Path]:
    """A data folder and a soft-label folder holding links to the first `shards` shards."""
    pairs = sequences.training_shards(run / "data", run / "soft_labels")[:shards]
    (into / "data" / "sequences").mkdir(parents=True)
    (into / "soft").mkdir()
    for seq, soft in pairs:
        (into / "data" / "sequences" / seq.name).symlink_to(seq)
        (into / "soft" / soft.name).symlink_to(soft)
    return into / "data", into / "soft"


def floor(data: Path, soft: Path) -> int:
    """Positions read: every training position has one soft-label row."""
    rows = 0
    for seq in sequences.shard_paths(data):
        pq.read_table(seq, columns=["train"])
        file = soft / seq.name
        rows += pq.read_table(file, columns=[c for c in ("idx", "logits", "rest")
                                             if c in pq.read_schema(file).names]).num_rows
    return rows


def stream(data: Path, soft: Path, max_len: int, batch: int) -> tuple[int, int]:
    """(batches, positions) of one epoch of streamed_batches."""
    batches = positions = 0
    for b in loop.streamed_batches(data, max_len, soft, batch, seed=0):
        batches += 1
        positions += int((np.asarray(b["target"]) > 0).sum())
    return batches, positions


def timed(fn):
    fn()  # warm: the page cache and the allocator
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--step-ms", type=float, default=288.0, help="a training step's time to compare a batch's read with")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        data, soft = subset(args.run, args.shards, Path(tmp))
        floor_s, rows = timed(lambda: floor(data, soft))
        stream_s, (batches, positions) = timed(lambda: stream(data, soft, args.max_len, args.batch))
    assert positions == rows, f"the stream gave {positions:,} positions, the files hold {rows:,}"
    ratio = (positions / stream_s) / (rows / floor_s)
    per_batch = 1000 * stream_s / batches
    print(f"{args.shards} shards, {rows:,} training positions, batches of {args.batch} windows, one thread")
    print(f"  floor  (pyarrow read_table):   {floor_s:7.2f} s  {rows / floor_s:>12,.0f} positions/s")
    print(f"  stream (loop.streamed_batches): {stream_s:7.2f} s  {positions / stream_s:>12,.0f} positions/s, "
          f"{batches:,} batches, {per_batch:.1f} ms a batch")
    print(f"  stream / floor throughput {ratio:.2f}x (target >= 0.8); a batch's read is "
          f"{100 * per_batch / args.step_ms:.1f}% of a {args.step_ms:.0f} ms step")


if __name__ == "__main__":
    main()
