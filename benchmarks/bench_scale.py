"""Evaluation at scale: peak memory and time of (1) a hot-refresh sweep over a GLDv2-sized gallery (761,757 × 512,
1,129 queries, the GLDv2 mAP@100 scorer), bctnb's in-place sweep against the reference layout (a mixed gallery
materialised and normalised at every step, as OpenCompatible's evaluation builds it), and (2) a cross-test of a
10 M × 128 feature-file pair (200 queries) read memory-mapped from `.npy` (the `features` protocol: old/old,
new/new, cross and reverse over a query/gallery split). Each arm runs in its own process; the parent samples the child's
/proc/<pid>/status every 0.1 s: peak VmRSS (everything resident, including the mapped file pages the kernel can drop)
and peak RssAnon (process memory proper, what must fit in RAM). Writes benchmarks/results/scale.json.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_scale.py [--quick] [--workdir DIR]

--quick: 1/10 of every size (a check that the script runs). The 10 M files (2 × 5.1 GB) go to --workdir
(default: a temporary folder, removed at the end).
"""
import argparse, json, os, shutil, subprocess, sys, tempfile, threading, time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np

OUT = Path(__file__).resolve().parent / "results" / "scale.json"
GIB = 1 << 30


# ------------------------------------------------------------------ child arms (run in their own process)
def _gallery(n, d, n_cls, seed):
    "Clustered features in chunks: class centre + noise; the new model's features are a noisy rotation of the old"
    rng = np.random.default_rng(seed)
    C = rng.normal(size=(n_cls, d)).astype(np.float32)
    R = np.linalg.qr(rng.normal(size=(d, d)))[0].astype(np.float32)
    y = rng.integers(0, n_cls, n)
    return C, R, y, rng


def arm_refresh(n, nq, d, impl):
    from bctnb.evaluate import gldv2_scorer, l2_normalize
    from bctnb.compat import hot_refresh, refresh_order
    C, R, y, rng = _gallery(n + nq, d, max(2, n // 76), 0)    # ~76 relevant items per query, as GLDv2's index
    Go = np.empty((n, d), np.float32); Gn = np.empty((n, d), np.float32)
    for a in range(0, n, 1 << 16):
        b = min(a + (1 << 16), n)
        Go[a:b] = C[y[a:b]] + rng.normal(size=(b - a, d)).astype(np.float32)
        Gn[a:b] = (Go[a:b] @ R) * 0.5 + C[y[a:b]] @ R + 0.3 * rng.normal(size=(b - a, d)).astype(np.float32)
    yq = y[n:]
    Qo = C[yq] + rng.normal(size=(nq, d)).astype(np.float32)
    Qn = (Qo @ R) * 0.5 + C[yq] @ R
    order = np.argsort(y[:n], kind="stable"); st = np.searchsorted(y[:n][order], np.arange(y.max() + 2))
    relevant = [order[st[c]:st[c + 1]] for c in yq]
    scorer = gldv2_scorer(relevant)
    steps, t = 5, time.perf_counter()
    if impl == "bctnb":
        r = hot_refresh(Qn, Go, Gn, scorer, q_old=Qo, orderings=("random",), steps=steps, seeds=(0,))
        curve = r.curves["mAP"].tolist()
    else:                                                     # reference layout: mixed gallery per step, normalised
        perm = refresh_order("random", Go, Gn, seed=0)
        pos = np.empty(n, np.int64); pos[perm] = np.arange(n)
        curve = []
        for i in range(steps + 1):
            G = np.where((pos < (i * n) // steps)[:, None], Gn, Go)
            curve.append(scorer(l2_normalize(Qn), l2_normalize(G))[0]["mAP"])
    return {"seconds": time.perf_counter() - t, "scorings": steps + 1, "curve_mAP": curve}


def make_files(work, n, nq, d):
    "old.npy / new.npy (memory-mapped writes), ids (.npy), labels (Parquet), query and gallery id lists"
    import pandas as pd
    C, R, y, rng = _gallery(n, d, max(2, n // 10), 1)
    ids = np.char.add("i", np.arange(n).astype(f"U{len(str(n))}"))      # short ids: <U9 at 10 M
    for name in ("old", "new"):
        X = np.lib.format.open_memmap(work / f"{name}.npy", mode="w+", dtype=np.float32, shape=(n, d))
        for a in range(0, n, 1 << 18):
            b = min(a + (1 << 18), n)
            base = C[y[a:b]] + rng.normal(size=(b - a, d)).astype(np.float32)
            X[a:b] = base if name == "old" else (base @ R) * 0.5 + C[y[a:b]] @ R
        X.flush(); del X
    np.save(work / "ids.npy", ids)
    pd.DataFrame({"id": ids, "label": y}).to_parquet(work / "labels.parquet")
    np.save(work / "query_ids.npy", ids[:nq]); np.save(work / "gallery_ids.npy", ids[nq:])


def arm_cross(work):
    from bctnb.features import load_features
    from bctnb.protocols import evaluate_protocol
    t = time.perf_counter()
    old = load_features(work / "old.npy", ids=work / "ids.npy", name="old")
    new = load_features(work / "new.npy", ids=work / "ids.npy", name="new")
    t_load = time.perf_counter() - t
    t = time.perf_counter()
    r = evaluate_protocol("features", old, {"new": new}, compat=False, refresh=False, table=old,
                          labels=work / "labels.parquet", query_ids=work / "query_ids.npy",
                          gallery_ids=work / "gallery_ids.npy")
    return {"seconds_load": t_load, "seconds_eval": time.perf_counter() - t, "old/old mAP": r.old_old["mAP"],
            "cross mAP": r.new["new"]["cross"]["mAP"], "self mAP": r.new["new"]["self"]["mAP"],
            "n_gallery": len(old) - int(np.load(work / "query_ids.npy").shape[0])}


# ------------------------------------------------------------------ parent: run an arm, sample its memory
def _status(pid):
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile"): out[k] = int(v.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return out


def run_arm(args):
    p = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(args)], stdout=subprocess.PIPE, text=True)
    peak = {"VmRSS": 0, "RssAnon": 0}
    def sample():
        while p.poll() is None:
            s = _status(p.pid)
            for k in peak: peak[k] = max(peak[k], s.get(k, 0))
            time.sleep(0.1)
    th = threading.Thread(target=sample); th.start()
    out, _ = p.communicate(); th.join()
    if p.returncode: raise SystemExit(f"arm {args} failed (exit {p.returncode})")
    res = json.loads(out.strip().splitlines()[-1])
    return {**res, "peak_rss_gib": peak["VmRSS"] / GIB, "peak_anon_gib": peak["RssAnon"] / GIB}


def main(quick=False, workdir=None):
    from bctnb.core import save_json
    from bctnb.runs import environment
    f = 10 if quick else 1
    n_ref, nq_ref, d_ref = 761_757 // f, 1_129, 512
    n_x, nq_x, d_x = 10_000_000 // f, 200, 128
    res = {"benchmark": "scale", "quick": quick, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
           "env": environment(), "refresh": {}, "cross": {}}
    gal = n_ref * d_ref * 4 / GIB
    for impl in ("reference", "bctnb"):
        r = run_arm({"arm": "refresh", "n": n_ref, "nq": nq_ref, "d": d_ref, "impl": impl})
        res["refresh"][impl] = r
        print(f"hot refresh {n_ref:,} × {d_ref} ({gal:.2f} GiB per gallery copy), {impl:9s}: "
              f"{r['seconds']:.0f} s for {r['scorings']} scorings, peak RSS {r['peak_rss_gib']:.2f} GiB "
              f"(anon {r['peak_anon_gib']:.2f})", flush=True)
    a, b = res["refresh"]["reference"], res["refresh"]["bctnb"]
    assert np.allclose(a["curve_mAP"], b["curve_mAP"], atol=0, rtol=0), "the two sweeps must give the same curve"
    res["refresh"]["gallery_copy_gib"] = gal
    res["refresh"]["peak_ratio"] = b["peak_anon_gib"] / a["peak_anon_gib"]
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="bctnb_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        if not (work / "gallery_ids.npy").exists(): make_files(work, n_x, nq_x, d_x)
        res["cross"]["seconds_make_files"] = time.perf_counter() - t
        r = run_arm({"arm": "cross", "work": str(work)})
        res["cross"].update(r, n=n_x, d=d_x, n_queries=nq_x, file_gib=n_x * d_x * 4 / GIB)
        print(f"cross-test {n_x:,} × {d_x} (two {n_x * d_x * 4 / GIB:.2f} GiB .npy files, {nq_x} queries): load "
              f"{r['seconds_load']:.0f} s, evaluate {r['seconds_eval']:.0f} s, peak RSS {r['peak_rss_gib']:.2f} GiB "
              f"(anon {r['peak_anon_gib']:.2f})", flush=True)
    finally:
        if not workdir: shutil.rmtree(work, ignore_errors=True)
    save_json(OUT if not quick else OUT.with_name("scale_quick.json"), res)
    print("wrote", OUT if not quick else OUT.with_name("scale_quick.json"))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workdir")
    ap.add_argument("--child")
    a = ap.parse_args()
    if a.child:
        c = json.loads(a.child)
        out = (arm_refresh(c["n"], c["nq"], c["d"], c["impl"]) if c["arm"] == "refresh" else arm_cross(Path(c["work"])))
        print(json.dumps(out))
    else:
        main(a.quick, a.workdir)
