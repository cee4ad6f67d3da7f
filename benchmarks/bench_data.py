"""Data benchmark, side by side in one process: (1) BatchAugment (flip + random resized crop + colour jitter) against
plain `normalize` on CPU-tier batches; (2) RecordIO random access (pread + JPEG decode) against reading the same JPEGs
from an image folder; (3) loading the cached emoji set against building it (build only with --build: it needs the
npm tarballs). Writes benchmarks/results/data.json with the machine description.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_data.py [--quick] [--build]
"""
import argparse, io, os, shutil, tempfile, time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np
import torch
from PIL import Image

from bctnb.core import save_json
from bctnb.runs import environment
from bctnb.benchmarks import RecordIODataset, write_recordio
from bctnb.data import BatchAugment, load_folder, normalize
from bctnb.emoji import build_emoji, emoji_home, load_emoji

OUT = Path(__file__).resolve().parent / "results" / "data.json"


def best_of(fn, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter(); fn(); best = min(best, time.perf_counter() - t)
    return best


def bench_augment(n_batches, batch=128, size=32):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g)
    aug = BatchAugment()
    t_norm = best_of(lambda: [normalize(x) for _ in range(n_batches)])
    t_aug = best_of(lambda: [aug(x, g) for _ in range(n_batches)])
    imgs = n_batches * batch
    return {"batch": batch, "size": size, "normalize_img_s": imgs / t_norm, "augment_img_s": imgs / t_aug,
            "augment_over_normalize": t_aug / t_norm}


def bench_recordio(n, size=112):
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        items = []
        for i in range(n):
            arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            b = io.BytesIO(); Image.fromarray(arr).save(b, "JPEG", quality=90)
            items.append((i % 100, b.getvalue()))
        items.sort(key=lambda t: t[0])
        write_recordio(d / "train", items)
        for i, (c, b) in enumerate(items):
            (d / "folder" / f"{c:03d}").mkdir(parents=True, exist_ok=True)
            (d / "folder" / f"{c:03d}" / f"{i:06d}.jpg").write_bytes(b)
        rec, fol = RecordIODataset(d / "train.rec"), load_folder(d / "folder")
        order = rng.permutation(n)
        t_rec = best_of(lambda: [rec[int(i)] for i in order])
        t_fol = best_of(lambda: [fol[int(i)] for i in order])
        mb = sum(len(b) for _, b in items) / 2**20
    return {"images": n, "size": size, "jpeg_MiB": mb, "recordio_img_s": n / t_rec, "folder_img_s": n / t_fol,
            "recordio_over_folder_time": t_rec / t_fol}


def bench_emoji(build):
    out = {}
    if build:
        tmp = Path(tempfile.mkdtemp())
        try:
            dl = emoji_home() / "downloads"
            if dl.exists(): shutil.copytree(dl, tmp / "downloads")
            t = time.perf_counter(); build_emoji(tmp); out["build_s"] = time.perf_counter() - t
        finally: shutil.rmtree(tmp)
    try:
        t = time.perf_counter(); ds = load_emoji(build=False); out["load_cached_s"] = time.perf_counter() - t
        out.update(classes=ds.num_classes, images=len(ds))
        if "build_s" in out: out["build_over_load"] = out["build_s"] / out["load_cached_s"]
    except Exception as e:                                         # no cache yet: report, do not fail the benchmark
        out["load_cached_s"] = None; out["note"] = f"{type(e).__name__}: {e}"
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--build", action="store_true", help="also time a full emoji build (needs the npm tarballs or npm)")
    a = ap.parse_args()
    res = {"augment": bench_augment(5 if a.quick else 40), "recordio": bench_recordio(200 if a.quick else 2000),
           "emoji": bench_emoji(a.build), "env": environment(), "threads": torch.get_num_threads()}
    au, rc, em = res["augment"], res["recordio"], res["emoji"]
    print(f"{'measure':44s} {'value':>12s}")
    print(f"{'normalize, img/s (batch 128, 32 px)':44s} {au['normalize_img_s']:12.0f}")
    print(f"{'BatchAugment, img/s':44s} {au['augment_img_s']:12.0f}")
    print(f"{'BatchAugment / normalize time':44s} {au['augment_over_normalize']:12.1f}")
    print(f"{'RecordIO random read+decode, img/s':44s} {rc['recordio_img_s']:12.0f}")
    print(f"{'folder random read+decode, img/s':44s} {rc['folder_img_s']:12.0f}")
    print(f"{'RecordIO / folder time':44s} {rc['recordio_over_folder_time']:12.2f}")
    for k, v in em.items():
        shown = v if isinstance(v, str) else "-" if v is None else f"{v:d}" if isinstance(v, int) else f"{v:.2f}"
        print(f"{'emoji ' + k:44s} {shown:>12s}")
    save_json(OUT, res)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
