"""How much room a PQ item table leaves: the teacher with its table product-quantised, no training.

    python benchmarks/bench_pq_diagnostic.py --run RUN_DIR [--teacher DIR] [--codes 2,3,4] [--codebook 256] [--seed 0]

Reads a finished run (`raykd prepare`, `raykd teacher`; e.g. configs/beauty.yaml, the text teacher).
The teacher's item table, folded with its text (id embedding + projected text vector, what it scores
against), is replaced by its product-quantised reconstruction: C codes per item, k-means with
`codebook` centroids in each sub-space (raykd.core.item_tables.kmeans_codes, seeded), each item's
vector the concatenation of its centroids. The rest of the teacher is unchanged and nothing is
trained. Every model is scored by the protocol of `raykd evaluate`: leave-one-out, full ranking over
the catalogue, the history excluded (validation: as training validates; test: a repeated target is a
miss, as the endpoint answers). The floors, measured in the same run: the teacher itself and most-popular.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from raykd.core import item_tables, metrics, models, rundir, sequences, text
from raykd.stages.evaluate import Popularity


def pq_teacher(teacher: torch.nn.Module, desc: dict, table: np.ndarray, codes: int, codebook: int,
               seed: int) -> tuple[torch.nn.Module, float]:
    """The teacher with a PQ item table fitted to `table` [V + 1, D] (its folded table), and the
    reconstruction's relative squared error ‖T − T̂‖² / ‖T‖² over the real items."""
    pq_desc = {k: v for k, v in desc.items() if k != "text_dim"}
    pq_desc["item_table"] = {"kind": "pq", "codes": codes, "codebook": codebook}
    model = models.build_model(pq_desc)
    rest = {k: v for k, v in teacher.state_dict().items() if not k.startswith(("item_emb.", "text_proj.", "item_text"))}
    missing, unexpected = model.load_state_dict(rest, strict=False)
    assert not unexpected and all(k.startswith("item_emb.") for k in missing), (missing, unexpected)
    assigned, centroids = item_tables.kmeans_codes(table[1:], codes, codebook, seed)
    model.item_emb.set_codes(assigned)
    with torch.no_grad():
        model.item_emb.codebooks.copy_(torch.from_numpy(centroids))
        recon = model.item_emb.weight[1:].numpy()
    err = float(((recon - table[1:]) ** 2).sum() / (table[1:] ** 2).sum())
    return model.eval(), err


def score(model, splits: dict, say) -> dict:
    """Validation and test NDCG@10 / Recall@10 (= HR@10 under leave-one-out) of one model."""
    out = {}
    for which, (hist, targets, seen, exclude) in splits.items():
        t0 = time.perf_counter()
        m = metrics.evaluate_model(model, hist, targets, seen, exclude_target=exclude)
        out[which] = {"ndcg@10": m["ndcg@10"], "recall@10": m["hr@10"]}
        say(f"  {which}: NDCG@10 {m['ndcg@10']:.4f}, Recall@10 {m['hr@10']:.4f} ({time.perf_counter() - t0:.0f}s)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, type=Path)
    ap.add_argument("--teacher", type=Path, default=None,
                    help="a teacher model folder other than RUN/teacher (e.g. a training checkpoint's best/)")
    ap.add_argument("--codes", default="2,3,4")
    ap.add_argument("--codebook", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--no-floors", action="store_true",
                    help="skip most-popular and the dense teacher (another process of the same run scores them)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    say = lambda s: print(s, flush=True)
    data_dir = args.run / rundir.DATA
    split = sequences.read_split(data_dir)
    valid_hist, valid_t, _ = sequences.eval_inputs(split, "valid")
    test_hist, test_t, _ = sequences.eval_inputs(split, "test")
    splits = {"valid": (valid_hist, valid_t, valid_hist, False), "test": (test_hist, test_t, test_hist, True)}
    teacher, desc = models.load_model(args.teacher or args.run / rundir.TEACHER)
    table = text.teacher_items(teacher)
    say(f"teacher {desc['family']} {desc['dim']}x{desc['layers']}, text_dim {desc.get('text_dim', 0)}; "
        f"{len(split['user']):,} users, {desc['num_items']:,} items; run {args.run}")
    counts = pq.read_table(data_dir / rundir.ITEMS, columns=["count"])["count"].to_numpy()
    rows = []
    if not args.no_floors:
        say("most-popular")
        rows.append(("most-popular", "–", 0, 0, score(Popularity(counts), splits, say)))
        say("teacher (dense folded table)")
        rows.append(("teacher", "–", models.count_params(teacher), models.count_bytes(teacher),
                     score(teacher, splits, say)))
    for c in [int(x) for x in args.codes.split(",") if x]:
        t0 = time.perf_counter()
        model, err = pq_teacher(teacher, desc, table, c, args.codebook, args.seed)
        say(f"PQ C={c}: k-means {time.perf_counter() - t0:.0f}s, relative reconstruction error {err:.3f}")
        rows.append((f"teacher, PQ C={c} x {args.codebook}", f"{err:.3f}", models.count_params(model),
                     models.count_bytes(model), score(model, splits, say)))
    ref = rows[1][4] if not args.no_floors else None
    say("\n| model | table rel. sq. error | size (elements) | bytes | valid NDCG@10 | valid Recall@10 | test NDCG@10 "
        "| test Recall@10 | test NDCG@10 vs teacher |")
    say("|---|---|---|---|---|---|---|---|---|")
    for name, err, n, b, m in rows:
        kept = f"{m['test']['ndcg@10'] / ref['test']['ndcg@10']:.1%}" if ref else "–"
        say(f"| {name} | {err} | {n:,} | {b:,} | {m['valid']['ndcg@10']:.4f} | {m['valid']['recall@10']:.4f} | "
            f"{m['test']['ndcg@10']:.4f} | {m['test']['recall@10']:.4f} | {kept} |")


if __name__ == "__main__":
    main()
