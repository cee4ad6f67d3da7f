"""Metrics benchmark: every vectorised metric in bctnb.evaluate against a straightforward per-query loop written
here (same numbers asserted, speed ratio reported), TAR@FAR on 15.6 M synthetic pairs, and the cost of a hot-refresh
sweep. Writes benchmarks/results/metrics.json with the machine description.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_metrics.py [--quick]
"""
import argparse, math, os, sys, time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np
from sklearn.metrics import roc_curve

from bctnb.core import save_json
from bctnb.runs import environment
from bctnb import evaluate as ev
from bctnb import compat as cp

OUT = Path(__file__).resolve().parent / "results" / "metrics.json"


def norm(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(rng, n, d, n_cls, noise=1.0):
    y = rng.integers(0, n_cls, n)
    c = rng.normal(size=(n_cls, d))
    return norm(c[y] + noise * rng.normal(size=(n, d))), y


def timed(fn, repeat=1):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter(); out = fn(); best = min(best, time.perf_counter() - t)
    return out, best


# ------------------------------------------------------------------ straightforward per-query loops
def stable_order(s):
    "descending score, ties by ascending index, for one query"
    return np.argsort(-s, kind="stable")


def loop_retrieval(Q, G, y, ks=(1, 5, 10)):
    aps, first = [], []
    S = Q @ G.T                                       # one sgemm, as in the vectorised code (bit-identical scores)
    for i in range(len(Q)):
        s = S[i].copy()
        s[i] = -np.inf
        o = stable_order(s)[:-1]                    # self is last
        rel = y[o] == y[i]
        if not rel.any():
            continue
        hits = np.cumsum(rel)
        aps.append(float((hits[rel] / (np.flatnonzero(rel) + 1)).mean()))
        first.append(int(np.argmax(rel)))
    first = np.array(first)
    return {"mAP": float(np.mean(aps)), **{f"R@{k}": float((first < k).mean()) for k in ks}}


def loop_revisited(sim, gnd, ks=(1, 5, 10)):
    out = {}
    for name, (okk, jk) in ev._SETTINGS.items():
        aps, pks = [], []
        for i, d in enumerate(gnd):
            ok = np.concatenate([np.asarray(d[k], int) for k in okk])
            junk = np.concatenate([np.asarray(d[k], int) for k in jk])
            if len(ok) == 0:
                continue
            o = stable_order(sim[i])
            pos = np.flatnonzero(np.isin(o, ok))
            jpos = np.flatnonzero(np.isin(o, junk))
            r = pos - np.searchsorted(jpos, pos)     # junk strictly before each positive
            j = np.arange(len(r))
            p0 = np.where(r == 0, 1.0, j / np.maximum(r, 1))
            aps.append(float(((p0 + (j + 1) / (r + 1)) / 2).sum() / len(ok)))
            rho = r + 1
            pks.append([(rho <= min(rho.max(), k)).sum() / min(rho.max(), k) for k in ks])
        pks = np.array(pks)
        out[name] = {"mAP": float(np.mean(aps)), **{f"mP@{k}": float(pks[:, t].mean()) for t, k in enumerate(ks)}}
    return out


def loop_gldv2(sim, relevant, k=100):
    aps = []
    for i, rel in enumerate(relevant):
        if len(rel) == 0:
            continue
        top = stable_order(sim[i])[:k]
        hit = np.isin(top, rel)
        aps.append(float((np.cumsum(hit)[hit] / (np.flatnonzero(hit) + 1)).sum() / min(len(set(rel)), k)))
    return float(np.mean(aps))


def loop_identification(P, ps, G, gs, ks=(1, 5, 10), fpirs=(1e-3, 1e-2, 1e-1)):
    mated = np.isin(ps, gs)
    first, sp, sm, best_nm = [], [], [], []
    S = P @ G.T
    for i in range(len(P)):
        s = S[i]
        if mated[i]:
            o = stable_order(s)
            first.append(int(np.argmax(gs[o] == ps[i])))
            sp.append(s[gs == ps[i]].max()); sm.append(s[gs != ps[i]].max())
        else:
            best_nm.append(s.max())
    first, sp, sm = np.array(first), np.array(sp), np.array(sm)
    out = {f"rank-{k}": float((first < k).mean()) for k in ks}
    L = np.sort(best_nm)[::-1]
    for f in fpirs:
        th = L[max(int(math.floor(f * len(L))) - 1, 0)]
        out[f"TPIR@FPIR={f:g}"] = float(((sp > sm) & (sp > th)).mean())
    return out


def loop_reid(Q, qp, qc, G, gp, gc, ks=(1, 5, 10)):
    keep = gp != -1
    G, gp, gc = G[keep], gp[keep], gc[keep]
    aps, first = [], []
    S = Q @ G.T
    for i in range(len(Q)):
        o = stable_order(S[i])
        o = o[~((gp[o] == qp[i]) & (gc[o] == qc[i]))]
        rel = (gp[o] == qp[i]) & (gp[o] != 0)
        if not rel.any():
            continue
        aps.append(float((np.cumsum(rel)[rel] / (np.flatnonzero(rel) + 1)).mean()))
        first.append(int(np.argmax(rel)))
    first = np.array(first)
    return {"mAP": float(np.mean(aps)), **{f"rank-{k}": float((first < k).mean()) for k in ks}}


def loop_tar_at_far(scores, labels, fars):
    fpr, tpr, _ = roc_curve(labels, scores)
    fpr, tpr = fpr[::-1], tpr[::-1]
    return {f: float(tpr[np.argmin(np.abs(fpr - f))]) for f in fars}


def loop_templates(f, tids, mids):
    """IJB-C template pooling as insightface's evaluation script does it: for each template, for each of its media,
    the mean of the media's image features (one image: itself), summed over media, then L2-normalised"""
    uniq = np.unique(tids)
    out = np.zeros((len(uniq), f.shape[1]), np.float32)
    for j, t in enumerate(uniq):
        ft, mt = f[tids == t], mids[tids == t]
        um, cnt = np.unique(mt, return_counts=True)
        media = [ft[mt == u].mean(0, keepdims=True) if c > 1 else ft[mt == u] for u, c in zip(um, cnt)]
        out[j] = np.sum(np.concatenate(media), 0)
    return uniq, norm(out)


def same(a, b, keys, tol=1e-9):
    for k in keys:
        assert abs(a[k] - b[k]) <= tol, (k, a[k], b[k])


# ------------------------------------------------------------------ cases
def main(quick=False):
    rng = np.random.default_rng(0)
    sc = 0.25 if quick else 1.0
    rows = []

    def record(name, size, t_vec, t_loop, extra=None):
        r = {"metric": name, "size": size, "vectorised_s": round(t_vec, 4), "loop_s": round(t_loop, 4) if t_loop else None,
             "speedup": round(t_loop / t_vec, 2) if t_loop else None, **(extra or {})}
        rows.append(r)
        print(f"{name:<28} {size:<34} vec {t_vec:8.3f}s  loop {t_loop if t_loop else float('nan'):8.3f}s  x{r['speedup']}")

    # §2.2 leave-one-out retrieval (CPU tier sizes)
    n = int(6000 * sc)
    X, y = clustered(rng, n, 128, n // 20)
    Xn = norm(X + 0.5 * rng.normal(size=X.shape))
    got, tv = timed(lambda: ev.retrieval_metrics(Xn, X, y))
    ref, tl = timed(lambda: loop_retrieval(Xn, X, y))
    same(got, ref, ["mAP", "R@1", "R@5", "R@10"])
    record("retrieval_metrics (LOO)", f"N={n}, d=128, cross", tv, tl)

    # §2.3 revisited (ROxford size: 70 queries × 4993)
    nq, ndb = 70, 4993
    sim = rng.random((nq, ndb)).astype(np.float32)
    gnd = []
    for i in range(nq):
        p = rng.permutation(ndb)
        gnd.append({"easy": p[:rng.integers(0, 60)].tolist(), "hard": p[60:60 + rng.integers(0, 60)].tolist(),
                    "junk": p[120:120 + rng.integers(0, 80)].tolist()})
    got, tv = timed(lambda: ev.revisited_map(sim, gnd), repeat=3)
    ref, tl = timed(lambda: loop_revisited(sim, gnd), repeat=3)
    for s in ("easy", "medium", "hard"): same(got[s], ref[s], ["mAP", "mP@1", "mP@5", "mP@10"])
    record("revisited_map", f"{nq}×{ndb}", tv, tl)

    # §2.4 GLDv2 mAP@100 (1129 queries; index scaled down to keep the full sim matrix in memory)
    nq, ndb = 1129, int(40000 * sc)
    sim = rng.random((nq, ndb)).astype(np.float32)
    relevant = [rng.choice(ndb, rng.integers(0, 30), replace=False).tolist() for _ in range(nq)]
    got, tv = timed(lambda: ev.gldv2_map_at_k(sim, relevant))
    ref, tl = timed(lambda: loop_gldv2(sim, relevant))
    assert abs(got["mAP@100"] - ref) < 1e-9
    record("gldv2_map_at_k (sim)", f"{nq}×{ndb}", tv, tl)
    Qg, _ = clustered(rng, nq, 128, 50); Gg, _ = clustered(rng, ndb, 128, 50)
    (D, I), tk = timed(lambda: ev.knn(Qg, Gg, 100))
    got = ev.gldv2_map_at_k(None, relevant, ranked=I)
    ref = loop_gldv2(Qg @ Gg.T, relevant)
    assert abs(got["mAP@100"] - ref) < 1e-9
    record("knn top-100 (faiss) + map", f"{nq}×{ndb}, d=128", tk, None)

    # §2.6 1:N identification (IJB-C-like: 1772 gallery templates, probes scaled)
    ng, npb = 1772, int(8000 * sc)
    G, _ = clustered(rng, ng, 128, ng, noise=0.0)
    gs = np.arange(ng)
    ps = np.where(rng.random(npb) < 0.5, rng.integers(0, ng, npb), ng + rng.integers(0, ng, npb))
    P = norm(G[ps % ng] + 0.08 * rng.normal(size=(npb, 128)))
    got, tv = timed(lambda: ev.identification_metrics(P, ps, G, gs))
    ref, tl = timed(lambda: loop_identification(P, ps, G, gs))
    same(got, ref, list(ref))
    record("identification_metrics", f"{npb} probes × {ng}", tv, tl)

    # §2.7 Market-1501 sizes: 3368 queries × 15913 gallery
    nq, ngal = int(3368 * sc), int(15913 * sc)
    Q, qp = clustered(rng, nq, 128, 750); G, gp = clustered(rng, ngal, 128, 750)
    gp = np.where(rng.random(ngal) < 0.1, 0, gp + 1); qp = qp + 1
    gp[rng.random(ngal) < 0.02] = -1
    qc, gc = rng.integers(1, 7, nq), rng.integers(1, 7, ngal)
    got, tv = timed(lambda: ev.reid_metrics(Q, qp, qc, G, gp, gc))
    ref, tl = timed(lambda: loop_reid(Q, qp, qc, G, gp, gc))
    same(got, ref, ["mAP", "rank-1", "rank-5", "rank-10"])
    record("reid_metrics", f"{nq}×{ngal}", tv, tl)

    # §2.5 TAR@FAR on IJB-C-sized synthetic pairs: 15,658,489 pairs, 19,557 genuine
    npairs, ngen = int(15_658_489 * (1 if not quick else 0.1)), int(19_557 * (1 if not quick else 0.1))
    labels = np.zeros(npairs, np.int8); labels[rng.choice(npairs, ngen, replace=False)] = 1
    scores = (rng.normal(size=npairs) * 0.1 + 0.45 * labels).astype(np.float32)
    got, tv = timed(lambda: ev.tar_at_far(scores, labels))
    ref, tl = timed(lambda: loop_tar_at_far(scores, labels, ev.IJBC_FARS))
    assert got == ref
    record("tar_at_far", f"{npairs:,} pairs", tv, tl, {"tar": got})

    # §2.5 IJB-C template pooling at IJB-C size: 469,375 images, 23,124 templates, 512-d
    n, nt = int(469_375 * (1 if not quick else 0.1)), int(23_124 * (1 if not quick else 0.1))
    tids = rng.integers(0, nt, n); mids = tids * 50 + rng.integers(0, 12, n)
    f = rng.normal(size=(n, 512)).astype(np.float32)
    (tv_ids, tv_f), tv = timed(lambda: ev.ijbc_templates(f, tids, mids))
    (tl_ids, tl_f), tl = timed(lambda: loop_templates(f, tids, mids))
    assert (tv_ids == tl_ids).all() and np.abs(tv_f - tl_f).max() < 1e-5
    record("ijbc_templates", f"{n:,} images, {len(tv_ids):,} templates", tv, tl)

    # §2.9 hot-refresh sweep cost: 11 steps × (3 random seeds + discrepancy) on LOO retrieval
    n = int(3000 * sc)
    Xo, y = clustered(rng, n, 128, n // 20)
    Xn = norm(Xo + 0.7 * rng.normal(size=Xo.shape))
    scorer = ev.loo_scorer(y)
    res, th = timed(lambda: cp.hot_refresh(Xn, Xo, Xn, scorer, q_old=Xo, orderings=("random", "discrepancy"), steps=10))
    n_eval = len(res.curves) + 1
    # per-query-loop cost of the same sweep, estimated from one loop evaluation
    _, t1 = timed(lambda: loop_retrieval(Xn, Xo, y))
    record("hot_refresh sweep", f"N={n}, {n_eval} evaluations", th, t1 * n_eval,
           {"per_evaluation_s": round(th / n_eval, 4), "loop_estimated": True})

    env = environment()
    print("\nmachine:", env.get("platform"), env.get("processor"), "cpus", env.get("cpu_count"),
          "OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS"))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    save_json(OUT, {"benchmark": "metrics", "quick": quick, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                    "environment": env, "results": rows})
    print("wrote", OUT)
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller sizes (smoke run)")
    main(ap.parse_args().quick)
