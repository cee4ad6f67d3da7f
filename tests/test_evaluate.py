"""bctnb.evaluate: every vectorised metric against a straightforward per-query loop written here from protocols.md §2,
on random data (tie-free and tie-heavy), plus the error paths a user hits."""
import json, math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_curve

from bctnb.core import ConfigError, NotFoundError
from bctnb import evaluate as ev
from bctnb import compat as cp
from bctnb import protocols as pt
from bctnb.losses import METHODS

from shared import fake_runs


# ---------------------------------------------------------------- reference loops (the definitions, one query at a time)
def _norm(x):
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _order(s, cand):
    "candidates sorted by descending score, ties by ascending index"
    return sorted(cand, key=lambda j: (-float(s[j]), j))


def ref_retrieval(S, qy, gy, self_exclude, ks):
    aps, hits, excl = [], {k: [] for k in ks}, 0
    for i in range(S.shape[0]):
        cand = [j for j in range(S.shape[1]) if not (self_exclude and j == i)]
        order = _order(S[i], cand)
        rel = [gy[j] == qy[i] for j in order]
        if not any(rel):
            excl += 1
            continue
        n_hit, ap = 0, 0.0
        for r, is_rel in enumerate(rel, 1):
            if is_rel:
                n_hit += 1
                ap += n_hit / r
        aps.append(ap / sum(rel))
        first = rel.index(True)
        for k in ks:
            hits[k].append(first < k)
    out = {"mAP": float(np.mean(aps)) if aps else float("nan")}
    out.update({f"R@{k}": float(np.mean(hits[k])) if aps else float("nan") for k in ks})
    out.update(n_queries=len(aps), n_excluded=excl)
    return out


def ref_revisited_setting(S, gnd, ok_keys, junk_keys, ks):
    aps, pks = [], []
    for i, d in enumerate(gnd):
        ok = [x for k in ok_keys for x in d.get(k, [])]
        junk = set(x for k in junk_keys for x in d.get(k, []))
        if len(ok) == 0:
            continue
        order = _order(S[i], range(S.shape[1]))
        okset, pos, nj = set(ok), [], 0
        for r, item in enumerate(order):
            if item in okset:
                pos.append(r - nj)          # junk strictly before this position
            if item in junk:
                nj += 1
        ap = 0.0
        for j, r in enumerate(pos):
            p0 = 1.0 if r == 0 else j / r
            p1 = (j + 1) / (r + 1)
            ap += (p0 + p1) / 2 / len(ok)
        aps.append(ap)
        rho = [r + 1 for r in pos]
        row = []
        for k in ks:
            kq = min(max(rho), k)
            row.append(sum(x <= kq for x in rho) / kq)
        pks.append(row)
    return aps, pks


def ref_gldv2(S, relevant, k):
    aps = []
    for i, rel in enumerate(relevant):
        rel = set(rel)
        if not rel:
            continue
        top = _order(S[i], range(S.shape[1]))[:k]
        hit, s = 0, 0.0
        for r, item in enumerate(top, 1):
            if item in rel:
                hit += 1
                s += hit / r
        aps.append(s / min(len(rel), k))
    return float(np.mean(aps)) if aps else float("nan"), len(aps)


# ---------------------------------------------------------------- data
def _clustered(rng, n, d, n_cls, noise=1.0):
    y = rng.integers(0, n_cls, n)
    centers = rng.normal(size=(n_cls, d))
    return (centers[y] + noise * rng.normal(size=(n, d))).astype(np.float32), y


def _tied(rng, n, d, n_cls):
    "integer features from a tiny alphabet: many exactly equal scores"
    y = rng.integers(0, n_cls, n)
    return rng.integers(-1, 2, size=(n, d)).astype(np.float32), y


# ---------------------------------------------------------------- §2.2 retrieval
@pytest.mark.parametrize("maker", [_clustered, _tied])
@pytest.mark.parametrize("seed", [0, 1])
def test_retrieval_matches_loop_same_and_cross_model(maker, seed):
    rng = np.random.default_rng(seed)
    Xo, y = maker(rng, 120, 6, 15)
    Xn = Xo + rng.normal(size=Xo.shape).astype(np.float32) * (0.5 if maker is _clustered else 0)
    for Q, G in [(Xo, Xo), (Xn, Xo)]:
        S = _norm(Q) @ _norm(G).T
        got = ev.retrieval_metrics(Q, G, y)
        ref = ref_retrieval(S, y, y, True, (1, 5, 10))
        assert got["n_queries"] == ref["n_queries"] and got["n_excluded"] == ref["n_excluded"]
        for k in ("mAP", "R@1", "R@5", "R@10"):
            assert got[k] == pytest.approx(ref[k], abs=1e-12), k


def test_retrieval_ap_equals_sklearn_on_tie_free_data():
    rng = np.random.default_rng(3)
    X, y = _clustered(rng, 80, 8, 6)
    m = ev.retrieval_metrics(X, X, y, per_query=True)
    S = _norm(X) @ _norm(X).T
    for i in range(len(X)):
        mask = np.arange(len(X)) != i
        rel = y[mask] == y[i]
        if rel.any():
            assert m["ap"][i] == pytest.approx(average_precision_score(rel, S[i, mask]), abs=1e-9)
        else:
            assert np.isnan(m["ap"][i])


def test_retrieval_split_gallery_and_blocks(monkeypatch):
    rng = np.random.default_rng(4)
    Q, qy = _clustered(rng, 50, 5, 7)
    G, gy = _clustered(rng, 70, 5, 7)
    ref = ref_retrieval(_norm(Q) @ _norm(G).T, qy, gy, False, (1, 5, 10))
    monkeypatch.setattr(ev, "_BLOCK", 150)          # force many small blocks (2 rows each)
    got = ev.retrieval_metrics(Q, G, qy, gallery_labels=gy)
    for k in ("mAP", "R@1", "R@5", "R@10", "n_queries"):
        assert got[k] == pytest.approx(ref[k], abs=1e-12)


def test_retrieval_excludes_queries_without_positives_and_nan_when_all_excluded():
    X = np.eye(4, dtype=np.float32)
    m = ev.retrieval_metrics(X, X, [0, 0, 1, 2])
    assert (m["n_queries"], m["n_excluded"]) == (2, 2)
    m = ev.retrieval_metrics(X, X, [0, 1, 2, 3])
    assert math.isnan(m["mAP"]) and math.isnan(m["R@1"]) and m["n_excluded"] == 4


def test_retrieval_bad_inputs():
    X = np.ones((3, 4), np.float32)
    with pytest.raises(ConfigError, match="Declare a transformation"):
        ev.retrieval_metrics(X, np.ones((3, 8)), [0, 0, 1])
    bad = X.copy(); bad[1, 2] = np.nan
    with pytest.raises(ConfigError, match="NaN/inf in 1 of 3 rows.*row 1"):
        ev.retrieval_metrics(bad, X, [0, 0, 1])
    with pytest.raises(ConfigError, match="gallery is empty"):
        ev.retrieval_metrics(X, np.zeros((0, 4)), [0, 0, 1], gallery_labels=[])
    # a declared transformation makes different dims comparable
    m = ev.retrieval_metrics(X, np.ones((3, 8)), [0, 0, 1], gallery_transform=lambda g: g[:, :4])
    assert m["n_queries"] == 2


# ---------------------------------------------------------------- knn
@pytest.mark.parametrize("maker", [_clustered, _tied])
def test_knn_matches_stable_ranking(maker):
    rng = np.random.default_rng(5)
    X, _ = maker(rng, 60, 5, 4)
    S = _norm(X) @ _norm(X).T
    D, I = ev.knn(X, X, 7)
    Ds, Is = ev.knn(X, X, 7, exclude_self=True)
    for i in range(len(X)):
        assert I[i].tolist() == _order(S[i], range(len(X)))[:7]
        assert Is[i].tolist() == _order(S[i], [j for j in range(len(X)) if j != i])[:7]
    assert np.allclose(D, np.take_along_axis(S, I, 1), atol=1e-6)


# ---------------------------------------------------------------- §2.3 revisited
def _random_gnd(rng, nq, ndb):
    gnd = []
    for i in range(nq):
        perm = rng.permutation(ndb)
        ne, nh, nj = rng.integers(0, 5, 3)
        if i % 7 == 0:
            ne = nh = 0                              # no positives at all
        gnd.append({"easy": perm[:ne].tolist(), "hard": perm[ne:ne + nh].tolist(), "junk": perm[ne + nh:ne + nh + nj].tolist()})
    return gnd


@pytest.mark.parametrize("tied", [False, True])
def test_revisited_matches_loop(tied):
    rng = np.random.default_rng(6)
    nq, ndb = 25, 40
    sim = (rng.integers(0, 4, (nq, ndb)) / 4 if tied else rng.random((nq, ndb))).astype(np.float32)
    gnd = _random_gnd(rng, nq, ndb)
    got = ev.revisited_map(sim, gnd)
    for name, (okk, jk) in ev._SETTINGS.items():
        aps, pks = ref_revisited_setting(sim, gnd, okk, jk, (1, 5, 10))
        assert got[name]["n_queries"] == len(aps) and got[name]["n_excluded"] == nq - len(aps)
        assert got[name]["mAP"] == pytest.approx(np.mean(aps), abs=1e-12)
        for t, k in enumerate((1, 5, 10)):
            assert got[name][f"mP@{k}"] == pytest.approx(np.mean([p[t] for p in pks]), abs=1e-12)


def test_revisited_queries_without_any_entries_at_block_end(monkeypatch):
    rng = np.random.default_rng(15)
    sim = rng.random((9, 30)).astype(np.float32)
    gnd = _random_gnd(rng, 9, 30)
    gnd[-1] = {"easy": [], "hard": [], "junk": []}
    gnd[4] = {"easy": [], "hard": [], "junk": []}
    monkeypatch.setattr(ev, "_BLOCK", 150)                  # blocks of 5 rows: both empty queries end a block
    got = ev.revisited_map(sim, gnd)
    aps, _ = ref_revisited_setting(sim, gnd, ("easy", "hard"), ("junk",), (1,))
    assert got["medium"]["mAP"] == pytest.approx(np.mean(aps), abs=1e-12) and got["medium"]["n_excluded"] >= 2


def test_revisited_k_capping_quirk_and_junk_before_positives():
    sim = np.array([[5, 4, 3, 2, 1, 0]], np.float32)
    # two positives at ranks 1 and 2 → P@10 = 2/2 = 1 (not 0.2)
    r = ev.revisited_map(sim, [{"easy": [0, 1], "hard": [], "junk": []}])
    assert r["medium"]["mP@10"] == 1.0 and r["medium"]["mP@5"] == 1.0
    # junk at ranks 1 and 2, positive at rank 3 → corrected rank 0 → AP 1
    r = ev.revisited_map(sim, [{"easy": [2], "hard": [], "junk": [0, 1]}])
    assert r["medium"]["mAP"] == 1.0 and r["medium"]["mP@1"] == 1.0


def test_revisited_bad_gnd():
    sim = np.zeros((1, 3), np.float32)
    with pytest.raises(ConfigError, match="outside the database"):
        ev.revisited_map(sim, [{"easy": [5], "hard": [], "junk": []}])
    with pytest.raises(ConfigError, match="outside the database"):
        ev.revisited_map(sim, [{"easy": [0], "hard": [], "junk": [-1]}])
    with pytest.raises(ConfigError, match="database is empty"):
        ev.revisited_map(np.zeros((1, 0)), [{"easy": []}])
    with pytest.raises(ConfigError, match="NaN"):
        ev.revisited_map(np.array([[np.nan, 0, 0]]), [{"easy": [0]}])


# ---------------------------------------------------------------- §2.4 GLDv2
@pytest.mark.parametrize("tied", [False, True])
def test_gldv2_matches_loop_both_paths(tied):
    rng = np.random.default_rng(7)
    nq, ndb, k = 30, 300, 100
    sim = (rng.integers(0, 5, (nq, ndb)) / 5 if tied else rng.random((nq, ndb))).astype(np.float32)
    relevant = [rng.choice(ndb, rng.integers(0, 150), replace=False).tolist() for _ in range(nq)]
    ref, nv = ref_gldv2(sim, relevant, k)
    got = ev.gldv2_map_at_k(sim, relevant, k)
    assert got["mAP@100"] == pytest.approx(ref, abs=1e-12) and got["n_queries"] == nv
    ranked = np.array([_order(sim[i], range(ndb))[:k] for i in range(nq)])
    assert ev.gldv2_map_at_k(None, relevant, k, ranked=ranked)["mAP@100"] == pytest.approx(ref, abs=1e-12)



def ref_delf_ap(prediction, solution, max_predictions):
    "DELF google_landmarks_dataset/metrics.py MeanAveragePrecision, one query: repeats skipped, positions kept"
    ap, seen, correct = 0.0, set(), 0
    for i in range(min(len(prediction), max_predictions)):
        if prediction[i] not in seen:
            if prediction[i] in solution:
                correct += 1
                ap += correct / (i + 1)
            seen.add(prediction[i])
    return ap / min(len(solution), max_predictions)


def test_gldv2_ranked_padding_and_duplicates_match_delf():
    rng = np.random.default_rng(3)
    nq, n_index, width, k = 200, 40, 25, 20
    relevant = [rng.choice(n_index, rng.integers(1, 12), replace=False).tolist() for _ in range(nq)]
    rows = []
    for _ in range(nq):             # ids with repeats, then -1 padding ("fewer than k results") of random length
        ids = rng.integers(0, n_index, rng.integers(0, width + 1)).tolist()
        rows.append(ids + [-1] * (width - len(ids)))
    ranked = np.array(rows)
    assert (ranked[:, :k] == -1).any(1).sum() > 50 and (ranked[1:, :k] == -1).any()
    ref = [ref_delf_ap([x for x in r if x != -1], set(s), k) for r, s in zip(rows, relevant)]
    got = ev.gldv2_map_at_k(None, relevant, k, ranked=ranked, n_index=n_index, per_query=True)
    np.testing.assert_allclose(got["ap"], ref, rtol=0, atol=1e-12)
    assert got["mAP@20"] == pytest.approx(np.mean(ref), abs=1e-12)
    with pytest.raises(ConfigError, match=r"ranked\[0, 1\] = 40 .*0\.\.39"):
        ev.gldv2_map_at_k(None, relevant, k, ranked=np.array([[0, 40]] + [[0, 1]] * (nq - 1)), n_index=n_index)


# ---------------------------------------------------------------- §2.5 TAR@FAR
def ref_tar_at_far(scores, labels, fars):
    fpr, tpr, _ = roc_curve(labels, scores)
    fpr, tpr = fpr[::-1], tpr[::-1]
    out = {}
    for f in fars:
        best, bi = None, None
        for i, x in enumerate(fpr):
            if best is None or abs(x - f) < best:
                best, bi = abs(x - f), i
        out[f] = float(tpr[bi])
    return out


def test_tar_at_far_matches_loop_and_below_smallest_far():
    rng = np.random.default_rng(8)
    n = 20000
    labels = (rng.random(n) < 0.05).astype(int)
    scores = rng.normal(size=n) + 2.5 * labels
    fars = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
    assert ev.tar_at_far(scores, labels, fars) == ref_tar_at_far(scores, labels, fars)
    # 1e-6 is below 1/#impostors: it reads the FPR = 0 point nearest to it
    fpr, tpr, _ = roc_curve(labels, scores)
    assert ev.tar_at_far(scores, labels, [1e-6])[1e-6] == tpr[fpr == 0].max()


@pytest.mark.parametrize("quant", [0, 4, 50])
def test_roc_points_equal_sklearn_fp32(quant):
    rng = np.random.default_rng(20 + quant)
    n = 30000
    y = (rng.random(n) < 0.1).astype(np.int8)
    s = rng.normal(size=n) + y
    if quant: s = np.round(s * quant) / quant
    s = s.astype(np.float32)
    s[:5] = -0.0; s[5:10] = 0.0                                   # -0.0 and 0.0 are one threshold
    fpr, tpr = ev.roc_points(s, y)
    F, T, _ = roc_curve(y, s)
    assert np.array_equal(fpr, F) and np.array_equal(tpr, T)
    fars = (1e-4, 1e-3, 1e-2, 1e-1)
    assert ev.tar_at_far(s, y, fars) == ref_tar_at_far(s, y, fars)


# ---------------------------------------------------------------- §2.5 templates
def test_ijbc_templates_media_mean_then_sum():
    rng = np.random.default_rng(9)
    f = rng.normal(size=(12, 4)).astype(np.float32)
    t = np.array([1, 1, 1, 1, 2, 2, 3, 3, 3, 3, 3, 3])
    m = np.array([1, 1, 2, 3, 4, 4, 5, 6, 6, 6, 7, 7])
    tids, tf = ev.ijbc_templates(f, t, m)
    for ti, tid in enumerate(tids):
        acc = np.zeros(4)
        for med in np.unique(m[t == tid]):
            acc += f[(t == tid) & (m == med)].mean(0)
        assert np.allclose(tf[ti], acc / np.linalg.norm(acc), atol=1e-6)
    tf_old = tf[::-1].copy()
    s = ev.ijbc_pair_scores(tids, tf_old, tf, [1, 2], [3, 3])      # cross: old on t1, new on t2
    assert np.allclose(s, [tf_old[0] @ tf[2], tf_old[1] @ tf[2]], atol=1e-6)


# ---------------------------------------------------------------- §2.6 1:N
def ref_identification(P, ps, G, gs, ks, fpirs):
    S = _norm(P) @ _norm(G).T
    mated = [i for i in range(len(P)) if ps[i] in set(gs)]
    nonm = [i for i in range(len(P)) if ps[i] not in set(gs)]
    out = {}
    for k in ks:
        h = 0
        for i in mated:
            order = _order(S[i], range(len(G)))
            first = next(r for r, j in enumerate(order) if gs[j] == ps[i])
            h += first < k
        out[f"rank-{k}"] = h / len(mated)
    L = sorted((S[i].max() for i in nonm), reverse=True)
    for f in fpirs:
        th = L[max(int(math.floor(f * len(nonm))) - 1, 0)]
        h = 0
        for i in mated:
            sp = max(S[i, j] for j in range(len(G)) if gs[j] == ps[i])
            sm = max(S[i, j] for j in range(len(G)) if gs[j] != ps[i])
            h += (sp > sm) and (sp > th)
        out[f"TPIR@FPIR={f:g}"] = h / len(mated)
    return out


def test_identification_matches_loop():
    rng = np.random.default_rng(10)
    G, gs = _clustered(rng, 40, 8, 40)
    gs = np.arange(40)
    P = G[rng.integers(0, 40, 150)] + rng.normal(size=(150, 8)).astype(np.float32)
    ps = np.where(rng.random(150) < 0.3, 1000 + np.arange(150), np.arange(150) % 40)
    got = ev.identification_metrics(P, ps, G, gs, ks=(1, 5, 10), fpirs=(1e-2, 1e-1, 0.5))
    ref = ref_identification(P, ps, G, gs, (1, 5, 10), (1e-2, 1e-1, 0.5))
    for k, v in ref.items():
        assert got[k] == pytest.approx(v, abs=1e-12), k


# ---------------------------------------------------------------- §2.7 re-ID
def test_reid_matches_loop():
    rng = np.random.default_rng(11)
    Q, qp = _clustered(rng, 40, 6, 8)
    G, gp = _clustered(rng, 200, 6, 8)
    qp, gp = qp + 1, gp + 1
    gp[rng.random(200) < 0.1] = 0                                  # distractors
    gp[rng.random(200) < 0.05] = -1                                 # junk
    qc, gc = rng.integers(1, 4, 40), rng.integers(1, 4, 200)
    got = ev.reid_metrics(Q, qp, qc, G, gp, gc)
    keep = gp != -1
    Gk, gpk, gck = G[keep], gp[keep], gc[keep]
    S = _norm(Q) @ _norm(Gk).T
    aps, firsts = [], []
    for i in range(len(Q)):
        cand = [j for j in range(len(Gk)) if not (gpk[j] == qp[i] and gck[j] == qc[i])]
        order = _order(S[i], cand)
        rel = [gpk[j] == qp[i] and gpk[j] != 0 for j in order]
        if not any(rel):
            continue
        h, ap = 0, 0.0
        for r, x in enumerate(rel, 1):
            if x:
                h += 1; ap += h / r
        aps.append(ap / sum(rel)); firsts.append(rel.index(True))
    assert got["mAP"] == pytest.approx(np.mean(aps), abs=1e-12)
    for k in (1, 5, 10):
        assert got[f"rank-{k}"] == pytest.approx(np.mean(np.array(firsts) < k), abs=1e-12)
    assert got["n_queries"] == len(aps)


# ---------------------------------------------------------------- §2.9 hot refresh
def test_hot_refresh_endpoints_grid_and_flip_rates():
    rng = np.random.default_rng(12)
    Xo, y = _clustered(rng, 90, 8, 12)
    Xn = Xo + 0.8 * rng.normal(size=Xo.shape).astype(np.float32)
    sc = ev.loo_scorer(y)
    u = rng.random(90)
    res = cp.hot_refresh(Xn, Xo, Xn, sc, q_old=Xo, orderings=("random", "discrepancy", "uncertainty", "sigma"),
                         steps=10, seeds=(0, 1, 2), uncertainty=u, sigma=-u)
    c = res.curves
    cross = ev.retrieval_metrics(Xn, Xo, y)
    self_ = ev.retrieval_metrics(Xn, Xn, y)
    assert np.allclose(c.loc[c.step == 0, "mAP"], cross["mAP"]) and np.allclose(c.loc[c.step == 10, "mAP"], self_["mAP"])
    assert c.loc[(c.ordering == "sigma"), "n_refreshed"].tolist() == [i * 90 // 10 for i in range(11)]
    assert len(res.summary) == 3 + 3
    # flip rates at β = 0.3 for the discrepancy ordering, recomputed by hand
    d = 1 - (_norm(Xn) * _norm(Xo)).sum(1)
    perm = sorted(range(90), key=lambda j: (-d[j], j))
    refreshed = np.zeros(90, bool); refreshed[perm[:27]] = True
    Gb = np.where(refreshed[:, None], Xn, Xo)
    mb = ev.retrieval_metrics(Xn, Gb, y, per_query=True)
    moo = ev.retrieval_metrics(Xo, Xo, y, per_query=True)
    valid = moo["first_rank"] >= 0
    cb, coo = mb["first_rank"][valid] == 0, moo["first_rank"][valid] == 0
    row = c[(c.ordering == "discrepancy") & (c.step == 3)].iloc[0]
    assert row.mAP == pytest.approx(mb["mAP"]) and row.n_refreshed == 27
    assert row.nfr == pytest.approx((coo & ~cb).sum() / valid.sum())
    assert row.pfr == pytest.approx((~coo & cb).sum() / valid.sum())
    # summaries follow their definitions
    M = c[c.ordering == "discrepancy"].mAP.to_numpy()
    s = res.summary[res.summary.ordering == "discrepancy"].iloc[0]
    assert s.auc == pytest.approx(np.trapezoid(M, np.linspace(0, 1, 11)))
    assert s.auc_mean == pytest.approx(M.mean())
    assert s.regression_depth == pytest.approx(max(0, res.old_old["mAP"] - M.min()))
    assert s.dips == int((np.diff(M) < 0).sum())


def test_hot_refresh_other_protocol_scorers():
    "revisited / GLDv2 / split-gallery scorers: β=0 is cross, β=1 is self, top-1 flags follow each protocol"
    rng = np.random.default_rng(14)
    nq, ng, d = 12, 60, 8
    Qn = rng.normal(size=(nq, d)).astype(np.float32)
    Go = rng.normal(size=(ng, d)).astype(np.float32)
    Gn = Go + rng.normal(size=(ng, d)).astype(np.float32)
    gnd = _random_gnd(rng, nq, ng)
    relevant = [rng.choice(ng, rng.integers(0, 6), replace=False).tolist() for _ in range(nq)]
    for scorer, ref in [(ev.revisited_scorer(gnd), lambda q, g: ev.revisited_map(_norm(q) @ _norm(g).T, gnd)["medium"]["mAP"]),
                        (ev.gldv2_scorer(relevant, k=10), lambda q, g: ev.gldv2_map_at_k(_norm(q) @ _norm(g).T, relevant, 10)["mAP@10"]),
                        (ev.split_scorer(rng.integers(0, 3, nq), rng.integers(0, 3, ng)), None)]:
        res = cp.hot_refresh(Qn, Go, Gn, scorer, q_old=Qn, orderings=("discrepancy",), steps=5)
        c = res.curves
        assert c.mAP.iloc[0] == pytest.approx(scorer(Qn, Go)[0]["mAP"]) and c.mAP.iloc[-1] == pytest.approx(scorer(Qn, Gn)[0]["mAP"])
        if ref is not None:
            assert c.mAP.iloc[0] == pytest.approx(ref(Qn, Go))
    # revisited top-1: the first non-junk item is a Medium positive
    S = _norm(Qn) @ _norm(Go).T
    _, top1 = ev.revisited_scorer(gnd)(Qn, Go)
    want = []
    for i, dd in enumerate(gnd):
        ok = set(dd["easy"]) | set(dd["hard"])
        if not ok: continue
        first = next(j for j in _order(S[i], range(ng)) if j not in set(dd["junk"]))
        want.append(first in ok)
    assert top1.tolist() == want
    # GLDv2 top-1: the best-scoring index image is relevant
    _, top1 = ev.gldv2_scorer(relevant, k=10)(Qn, Go)
    assert top1.tolist() == [_order(S[i], range(ng))[0] in set(r) for i, r in enumerate(relevant) if r]


def test_hot_refresh_bad_inputs():
    X = np.ones((4, 3), np.float32)
    sc = ev.loo_scorer([0, 0, 1, 1])
    with pytest.raises(ConfigError, match="differ in dimension"):
        cp.hot_refresh(X, X, np.ones((4, 5)), sc)
    with pytest.raises(ConfigError, match="ordering='bogus'"):
        cp.hot_refresh(X, X, X, sc, orderings=("bogus",))


# ---------------------------------------------------------------- §2.10 compatibility matrix
def test_compatibility_matrix_from_scorer_and_tie_rule():
    rng = np.random.default_rng(13)
    X1, y = _clustered(rng, 60, 6, 6)
    feats = [X1, X1 + 0.3 * rng.normal(size=X1.shape).astype(np.float32), X1 + 0.6 * rng.normal(size=X1.shape).astype(np.float32)]
    C = cp.compatibility_matrix(feats, ev.loo_scorer(y))
    assert np.isnan(C[0, 1]) and np.isnan(C[0, 2]) and np.isnan(C[1, 2])
    assert C[2, 0] == pytest.approx(ev.retrieval_metrics(feats[2], feats[0], y)["mAP"])
    s = cp.compatibility_summary(C)
    i, j = np.tril_indices(3, -1)
    assert s["AC"] == pytest.approx(np.mean(C[i, j] > np.diag(C)[j]))
    tie = np.array([[.5, np.nan], [.5, .6]])
    assert cp.compatibility_summary(tie)["AC"] == 0.0 and cp.compatibility_summary(tie, ties="pass")["AC"] == 1.0
    with pytest.raises(ConfigError, match="must be measured"):
        cp.compatibility_summary(np.array([[.5, np.nan], [np.nan, .6]]))


# ---------------------------------------------------------------- features_for + the papermill pipeline
def test_features_for_run_folder_cache_hit_and_key(tmp_path):
    import torch
    from bctnb.data import load_dataset
    old, (new, _) = fake_runs(tmp_path / "runs")
    ds = load_dataset("synthetic").subset(np.arange(10))
    f1, p1 = pt.features_for(old.path, ds, cache_dir=tmp_path / "cache", return_path=True)
    f2, p2 = pt.features_for(old.path, ds, cache_dir=tmp_path / "cache", return_path=True)
    assert p1 == p2 and np.array_equal(f1, f2) and f1.shape == (10, 16)
    f3, p3 = pt.features_for(new.path, ds, cache_dir=tmp_path / "cache", return_path=True)
    assert p3 != p1 and not np.allclose(f1, f3)
    _, p4 = pt.features_for(old.path, ds, flip="sum", cache_dir=tmp_path / "cache", return_path=True)
    _, p5 = pt.features_for(old.path, load_dataset("synthetic").subset(np.arange(1, 11)), cache_dir=tmp_path / "cache", return_path=True)
    assert len({p1, p4, p5}) == 3
    with pytest.raises(ConfigError, match="cannot use"):
        pt.features_for(42, ds, cache_dir=tmp_path / "cache")


@pytest.mark.slow
def test_evaluate_notebook_papermill(tmp_path):
    import json
    from pathlib import Path
    import papermill as pm
    root = Path(__file__).resolve().parents[1]
    old, news = fake_runs(tmp_path / "runs", methods=("independent", "l2", "nccl", "fct"))
    fct, g = METHODS.get("fct"), torch.Generator().manual_seed(0)   # an h(old), fitted and saved as FCT's post stage
    o = torch.randn(64, 16, generator=g)
    h = fct.fit_gallery_transform(o, o @ torch.randn(16, 16, generator=g), epochs=1)
    fct.save_gallery_transform(news[3].path / fct.gallery_transform_file(), h)
    out = tmp_path / "eval"
    pm.execute_notebook(str(root / "nbs" / "evaluate.ipynb"), str(tmp_path / "evaluate_out.ipynb"), kernel_name="python3",
                        cwd=str(root / "nbs"), progress_bar=False, execution_timeout=600,
                        parameters=dict(old_run=str(old.path), new_runs=json.dumps([str(r.path) for r in news]),
                                        refresh_steps=4, refresh_seeds=[0, 1], out_dir=str(out), cache_dir=str(tmp_path / "cache")))
    (ed,) = [p for p in out.iterdir() if p.name.startswith("evaluate-")]
    res = json.loads((ed / "evaluation.json").read_text())
    assert res["n_test_classes"] == 4 and res["n_test"] == 20
    assert set(res["new"]) == {"independent", "l2", "nccl", "fct"} and res["independent"] == "independent"
    # the default protocol (cpu_tier); FCT's run is cross-tested through the h its method saved, no FCT-specific code
    assert res["protocol"] == "cpu_tier" and "TAR" in res["old/old"]
    assert res["new"]["fct"]["gallery"] == "h(old)" and res["new"]["fct"]["transformed"]
    assert res["new"]["independent"]["gallery"] == "old" and not res["new"]["independent"]["transformed"]
    # the notebook's numbers are the library's numbers on the same features
    from bctnb.data import load_dataset, make_split
    ds = load_dataset("synthetic")
    sp = make_split(ds.labels, "open-class", old_ratio=0.3, seed=0, test_ratio=0.2, keys=ds.keys)
    test = ds.subset(sp.test); y = ds.labels[sp.test]
    Fo = pt.features_for(old.path, test, cache_dir=tmp_path / "cache")
    Fl2 = pt.features_for(news[1].path, test, cache_dir=tmp_path / "cache")
    assert res["old/old"]["mAP"] == pytest.approx(ev.retrieval_metrics(Fo, Fo, y)["mAP"])
    assert res["new"]["l2"]["cross"]["mAP"] == pytest.approx(ev.retrieval_metrics(Fl2, Fo, y)["mAP"])
    assert res["new"]["l2"]["upgrade"]["criterion"] == (res["new"]["l2"]["cross"]["mAP"] > res["old/old"]["mAP"])
    assert len(res["compat"]["C"]) == 1 + len(news) and res["compat"]["ties"] == "fail"   # the old model + each new one
    assert {s["ordering"] for s in res["refresh"]["l2"]["summary"]} == {"random", "discrepancy", "uncertainty"}
    for f in ("table.csv", "refresh_curves.csv", "refresh_summary.csv", "compat_matrix.csv", "refresh.png", "compat_matrix.png"):
        assert (ed / f).exists(), f
    status = json.loads((ed / "status.json").read_text())
    assert status["status"] == "done"
    arts = json.loads((ed / "artefacts.json").read_text())
    assert "evaluation.json" in arts and "refresh.png" in arts


# ---------------------------------------------------------------- benchmark protocols end to end (evaluate_protocol)
from benchmark_fixtures import save_tiny_model, write_gldv2, write_ijbc, write_market1501, write_revisited

IJBC_KEYS = ({f"TAR@FAR={f:g}" for f in ev.IJBC_FARS}
             | {f"{g}_{m}" for g in ("G1", "G2", "mean") for m in ("rank-1", "rank-5", "rank-10", "TPIR@FPIR=0.001", "TPIR@FPIR=0.01", "TPIR@FPIR=0.1")}
             | {f"overall_rank-{k}" for k in (1, 5, 10)})
REVISITED_KEYS = {f"{s}{m}" for s in ("", "easy_", "hard_") for m in ("mAP", "mP@1", "mP@5", "mP@10")}
BENCH = {   # protocol: (fixture writer, protocol options, metric keys of protocols.md, primary metric)
    "ijbc": (write_ijbc, {"image_size": 32}, IJBC_KEYS, "TAR@FAR=0.0001"),
    "roxford5k": (lambda r: write_revisited(r, "roxford5k"), {}, REVISITED_KEYS, "mAP"),
    "rparis6k": (lambda r: write_revisited(r, "rparis6k", n_landmarks=3), {}, REVISITED_KEYS, "mAP"),
    "gldv2": (write_gldv2, {"usage": ["Private", "Public"]}, {"mAP@100"}, "mAP@100"),
    "market1501": (write_market1501, {}, {"rank-1", "rank-5", "rank-10", "mAP"}, "mAP"),
}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    "old (dim 8, softmax head for the uncertainty ordering), another random new model, and a 12-dim one"
    root = tmp_path_factory.mktemp("tiny_models")
    return (save_tiny_model(root / "old", dim=8, seed=0, head_classes=5), save_tiny_model(root / "new", dim=8, seed=1),
            save_tiny_model(root / "wide", dim=12, seed=2))


def _library_cross(name, root, old, new, kw, cache):
    "The cross test M(new, old) recomputed from raw features with the protocol's metric functions (no scorer, no registry)"
    from bctnb.data import load_dataset
    feats = lambda m, ds, flip="none": pt.features_for(m, ds, flip=flip, cache_dir=cache, batch_size=1)
    if name == "ijbc":
        ds = load_dataset("ijbc", root=root, size=kw["image_size"])
        tpl = {}
        for role, m in (("old", old), ("new", new)):
            g = ev.ijbc_image_features(feats(m, ds, "sum"), ds.meta["det_score"])
            tids, tpl[role] = ev.ijbc_templates(g, ds.meta["template"], ds.meta["media"])
        P = ds.pairs()
        ver = ev.ijbc_verification(tids, tpl["old"], tpl["new"], P[:, 0], P[:, 1], P[:, 2])
        gp = ds.gallery_probe()
        rows = lambda t: np.searchsorted(tids, t)
        ide = ev.ijbc_identification(tpl["new"][rows(gp["probe"][:, 0])], gp["probe"][:, 1],
                                     {g: (tpl["old"][rows(gp[g][:, 0])], gp[g][:, 1]) for g in ("G1", "G2")})
        out = {f"TAR@FAR={f:g}": v for f, v in ver["cross"].items()}
        out.update({f"mean_{k}": v for k, v in ide["mean"].items()}, **{f"overall_{k}": v for k, v in ide["overall"].items()})
        out["_swapped"] = {f"TAR@FAR={f:g}": v for f, v in ver["cross_swapped"].items()}
        return out
    if name in ("roxford5k", "rparis6k"):
        q, db = load_dataset(name, root=root, split="query"), load_dataset(name, root=root, split="db")
        r = ev.revisited_map(_norm(feats(new, q)) @ _norm(feats(old, db)).T, q.gnd)
        return {"mAP": r["medium"]["mAP"], "easy_mAP": r["easy"]["mAP"], "hard_mAP": r["hard"]["mAP"], "mP@10": r["medium"]["mP@10"],
                "n_excluded": r["medium"]["n_excluded"]}
    if name == "gldv2":
        te, ix = load_dataset("gldv2", root=root, split="test"), load_dataset("gldv2", root=root, split="index")
        sel = np.flatnonzero(np.isin(te.meta["usage"], kw["usage"]))
        r = ev.gldv2_map_at_k(_norm(feats(new, te.subset(sel))) @ _norm(feats(old, ix)).T, [te.relevant[i] for i in sel], 100)
        return {"mAP@100": r["mAP@100"], "n_queries": r["n_queries"], "n_excluded": r["n_excluded"]}
    q, g = load_dataset("market1501", root=root, split="query"), load_dataset("market1501", root=root, split="gallery")
    r = ev.reid_metrics(feats(new, q, "sum"), q.meta["pid"], q.meta["camid"], feats(old, g, "sum"), g.meta["pid"], g.meta["camid"])
    return {k: r[k] for k in ("mAP", "rank-1", "rank-5", "n_queries")}


@pytest.mark.parametrize("name", list(BENCH))
def test_benchmark_protocol_roles_metrics_refresh_and_matrix(name, tmp_path, tiny_models):
    old, new, _ = tiny_models
    write, kw, keys, primary = BENCH[name]
    root = write(tmp_path / name)
    cache = tmp_path / "cache"
    res = pt.evaluate_protocol(name, old, {"copy": old, "new": new}, data_root=root, independent="new", refresh_steps=2,
                               refresh_seeds=(0,), cache_dir=cache, **kw)
    assert res.metric == primary and keys <= set(res.old_old)
    # a new model with the old weights: self, cross and reverse all equal old/old, and the strict criterion fails (tie)
    for role in ("self", "cross", "reverse"):
        assert res.new["copy"][role] == res.old_old, role
    assert res.new["copy"]["upgrade"]["criterion"] is False and res.table.loc["copy", "criterion"] == "fail"
    # metrics are fractions
    for r in (res.old_old, *(res.new["new"][x] for x in ("self", "cross", "reverse"))):
        for k in keys:
            assert math.isnan(r[k]) or 0.0 <= r[k] <= 1.0, (k, r[k])
    # the cross test is the library's metric on (new queries, OLD gallery)
    want = _library_cross(name, root, old, new, kw, cache)
    cross = res.new["new"]["cross"]
    for k, v in want.items():
        if k == "_swapped":
            assert res.new["new"]["cross_swapped"] == pytest.approx(v, abs=1e-12)
        else:
            assert cross[k] == pytest.approx(v, abs=1e-6), k
    # §2.8 on the primary metric; n = n* here, so the tax is 0 and the gain is (cross - oo) / (self - oo)
    u = res.new["new"]["upgrade"]
    assert u["criterion"] == (cross[primary] > res.old_old[primary]) and u["tax"] == 0.0
    # hot refresh of the gallery side: β = 0 is cross, β = 1 is self; the old head enables the uncertainty ordering
    c = res.refresh["new"].curves
    assert set(c.ordering) == {"random", "discrepancy", "uncertainty"}
    assert np.allclose(c.loc[c.step == 0, primary], cross[primary], equal_nan=True)
    assert np.allclose(c.loc[c.step == 2, primary], res.new["new"]["self"][primary], equal_nan=True)
    # compatibility matrix: old, copy, new on the primary metric
    C = np.array(res.compat["C"], dtype=float)
    assert res.compat["models"] == ["old", "copy", "new"] and C.shape == (3, 3)
    assert np.allclose([C[0, 0], C[2, 0]], [res.old_old[primary], cross[primary]], equal_nan=True)
    assert set(res.table.columns) >= {f"cross {primary}", "criterion", "update gain", "tax"}
    json.dumps(res.to_json(), default=float)                                  # what the pipeline stores


def test_benchmark_protocol_counts_follow_the_protocols(tmp_path, tiny_models):
    "queries without anything to find are excluded (counted), junk and same-camera images are not retrieved"
    old, new, _ = tiny_models
    c = lambda name, **kw: pt.evaluate_protocol(name, old, {"new": new}, data_root=BENCH[name][0](tmp_path / name), refresh=False,
                                                compat=False, cache_dir=tmp_path / "cache", **kw)
    r = c("roxford5k").old_old
    assert (r["n_queries"], r["n_excluded"]) == (4, 1)
    r = c("gldv2", usage=["Private", "Public"])
    assert (r.old_old["n_queries"], r.old_old["n_excluded"], r.info["n_queries"]) == (4, 1, 6 - 1)
    assert c("gldv2").info["n_queries"] == 4                                  # default: Private only (3 landmarks + 1 excluded)
    r = c("market1501")
    assert r.old_old["n_queries"] == 4 and r.info["n_gallery"] == 4 * 3 + 3    # junk (-1) dropped, distractors kept
    r = c("ijbc", image_size=32)
    assert r.info["n_templates"] == 12 and r.info["n_genuine"] == 6 and r.old_old["G1_n_mated"] == 3
    (tmp_path / "ijbc" / "IJBC" / "meta" / "ijbc_1N_probe_mixed.csv").unlink()              # the 1:N files are optional
    r = pt.evaluate_protocol("ijbc", old, {"new": new}, data_root=tmp_path / "ijbc", image_size=32, refresh=False, cache_dir=tmp_path / "cache")
    assert not r.info["one_to_n"] and "ijbc_1N_probe_mixed.csv" in r.info["note"] and "mean_rank-1" not in r.old_old
    assert "TAR@FAR=0.0001" in r.old_old and "cross mean_rank-1" not in r.table.columns


def test_benchmark_protocol_errors(tmp_path, tiny_models, monkeypatch):
    old, new, wide = tiny_models
    cache = tmp_path / "cache"
    with pytest.raises(NotFoundError) as e:
        pt.evaluate_protocol("gldv2", old, {"new": new}, data_root=tmp_path / "nope")
    msg = str(e.value)
    assert "Expected layout" in msg and "data_cards/gldv2.md" in msg and str(tmp_path / "nope") in msg
    # data_root=None: $BCTNB_DATA/<protocol>
    monkeypatch.setenv("BCTNB_DATA", str(tmp_path / "home"))
    with pytest.raises(NotFoundError, match=r"data_root=None reads \$BCTNB_DATA/ijbc"):
        pt.evaluate_protocol("ijbc", old, {"new": new})
    write_market1501(tmp_path / "home" / "market1501")
    assert pt.evaluate_protocol("market1501", old, {"new": new}, refresh=False, cache_dir=cache).info["n_queries"] == 4
    # another embedding dimension needs a declared transformation
    rox = write_revisited(tmp_path / "rox")
    with pytest.raises(ConfigError, match="needs a declared transformation"):
        pt.evaluate_protocol("roxford5k", old, {"wide": wide}, data_root=rox, cache_dir=cache)
    r = pt.evaluate_protocol("roxford5k", old, {"wide": wide}, data_root=rox, skip_incompatible=True, cache_dir=cache)
    assert r.new["wide"]["cross"] is None and r.table.loc["wide", "criterion"] == "n/a (dims differ)" and r.refresh == {}
    r = pt.evaluate_protocol("roxford5k", old, {"wide": wide}, data_root=rox, gallery_transforms={"wide": lambda g: np.pad(g, ((0, 0), (0, 4)))},
                             refresh_steps=1, refresh_seeds=(0,), cache_dir=cache)
    assert r.new["wide"]["transformed"] and r.new["wide"]["cross"]["n_queries"] == 4 and set(r.refresh) == {"wide"}
    # an empty database, an unknown protocol / metric / usage
    empty = tmp_path / "empty"; (empty / "jpg").mkdir(parents=True)
    import pickle
    with open(empty / "gnd_roxford5k.pkl", "wb") as f:
        pickle.dump({"imlist": [], "qimlist": ["roxford5k_q_0"], "gnd": [{"bbx": [0, 0, 4, 4], "easy": [], "hard": [], "junk": []}]}, f)
    with pytest.raises(ConfigError, match="gallery/database is empty"):
        pt.evaluate_protocol("roxford5k", old, {"new": new}, data_root=empty, cache_dir=cache)
    with pytest.raises(ConfigError, match="Did you mean 'market1501'"):
        pt.evaluate_protocol("market1502", old, {"new": new})
    with pytest.raises(ConfigError, match="choose one of: mAP, mP@1"):
        pt.evaluate_protocol("roxford5k", old, {"new": new}, data_root=rox, metric="AUC", cache_dir=cache)
    with pytest.raises(ConfigError, match="usage='Hidden'"):
        pt.evaluate_protocol("gldv2", old, {"new": new}, data_root=tmp_path / "nope", usage="Hidden")
    # IJB-C protocol files that do not match the image list
    ij = write_ijbc(tmp_path / "ij")
    (ij / "IJBC" / "meta" / "ijbc_1N_gallery_G2.csv").write_text("TEMPLATE_ID,SUBJECT_ID,FILENAME\n999,4,x.jpg\n")
    with pytest.raises(ConfigError, match="G2 template ids are not among the 12 templates"):
        pt.evaluate_protocol("ijbc", old, {"new": new}, data_root=ij, image_size=32, cache_dir=cache)


@pytest.mark.slow
def test_evaluate_notebook_papermill_ijbc(tmp_path):
    "the pipeline on a benchmark: models trained elsewhere (synthetic) evaluated on a tiny IJB-C, one of them a bare model folder"
    import papermill as pm
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    old, news = fake_runs(tmp_path / "runs", methods=("independent", "l2"))
    bare = save_tiny_model(tmp_path / "bare_model", dim=16, seed=3, meta={"method": "bare"})
    ij = write_ijbc(tmp_path / "ijbc_data")
    out = tmp_path / "eval"
    pm.execute_notebook(str(root / "nbs" / "evaluate.ipynb"), str(tmp_path / "evaluate_ijbc_out.ipynb"), kernel_name="python3",
                        cwd=str(root / "nbs"), progress_bar=False, execution_timeout=600,
                        parameters=dict(old_run=str(old.path), new_runs=json.dumps([str(r.path) for r in news] + [str(bare)]),
                                        protocol="ijbc", data_root=str(ij), protocol_kw=json.dumps({"image_size": 32}),
                                        refresh_steps=2, refresh_seeds=[0], out_dir=str(out), cache_dir=str(tmp_path / "cache")))
    (ed,) = [p for p in out.iterdir() if p.name.startswith("evaluate-")]
    res = json.loads((ed / "evaluation.json").read_text())
    assert res["protocol"] == "ijbc" and res["metric"] == "TAR@FAR=0.0001" and res["independent"] == "independent"
    assert res["config"]["protocol_kw"] == {"image_size": 32} and res["data"]["n_templates"] == 12
    assert set(res["new"]) == {"independent", "l2", "bare"} and res["new"]["bare"]["run"] == "bare_model"
    assert IJBC_KEYS <= set(res["old/old"]) and set(res["new"]["l2"]["cross_swapped"]) == {f"TAR@FAR={f:g}" for f in ev.IJBC_FARS}
    want = _library_cross("ijbc", ij, old.path, news[1].path, {"image_size": 32}, tmp_path / "cache")
    for k in ("TAR@FAR=0.0001", "TAR@FAR=0.1", "mean_rank-1", "overall_rank-1"):
        assert res["new"]["l2"]["cross"][k] == pytest.approx(want[k], abs=1e-6), k
    assert res["new"]["l2"]["upgrade"]["criterion"] == (res["new"]["l2"]["cross"]["TAR@FAR=0.0001"] > res["old/old"]["TAR@FAR=0.0001"])
    assert len(res["compat"]["C"]) == 4 and res["compat"]["metric"] == "TAR@FAR=0.0001"
    assert {s["ordering"] for s in res["refresh"]["l2"]["summary"]} == {"random", "discrepancy", "uncertainty"}
    for f in ("table.csv", "metrics.csv", "refresh_curves.csv", "refresh_summary.csv", "compat_matrix.csv", "refresh.png", "compat_matrix.png"):
        assert (ed / f).exists(), f
    assert json.loads((ed / "status.json").read_text())["status"] == "done"


@pytest.mark.slow
def test_evaluate_notebook_on_feature_files_with_bridges(tmp_path):
    """`-p protocol features -p bridges`: stored embeddings of a rotated (incompatible) new model; the bridges are
    fitted on calibration classes that are never scored, and the decision table shows them restoring compatibility"""
    import papermill as pm
    from pathlib import Path
    g = np.random.default_rng(1); C = g.normal(size=(12, 8)); y = np.repeat(np.arange(12), 10)
    Xo = (C[y] + 0.6 * g.normal(size=(120, 8))).astype(np.float32)
    Xn = (Xo @ np.linalg.qr(g.normal(size=(8, 8)))[0]).astype(np.float32)
    ids = np.array([f"i{k:03d}" for k in range(120)])
    np.savez(tmp_path / "old.npz", ids=ids, feats=Xo, labels=y)
    np.save(tmp_path / "new.npy", Xn[::-1]); (tmp_path / "new.ids.txt").write_text("\n".join(ids[::-1]))
    root = Path(__file__).resolve().parents[1]
    pm.execute_notebook(str(root / "nbs" / "evaluate.ipynb"), str(tmp_path / "out.ipynb"), kernel_name="python3",
                        cwd=str(root / "nbs"), progress_bar=False, execution_timeout=600,
                        parameters=dict(protocol="features", old_features=str(tmp_path / "old.npz"),
                                        new_features=str(tmp_path / "new.npy"), bridges='["lstsq", "procrustes"]',
                                        calib_ratio=0.25, refresh_steps=2, refresh_seeds=[0],
                                        out_dir=str(tmp_path / "e")))
    (ed,) = (tmp_path / "e").iterdir()
    res = json.loads((ed / "evaluation.json").read_text())
    assert res["n_test"] == 90 and res["bridges"]["n_calibration"] == 30          # 3 of 12 classes calibrate
    table = {r["option"]: r for r in res["bridges"]["tables"]["new"]}
    assert table["none (new model as it is)"]["cross mAP"] < 0.3
    assert res["new"]["new"]["upgrade"]["criterion"] is False
    for side in ("gallery", "query"):
        assert table[f"new+procrustes ({side})"]["gain"] > 0.3, table
    assert res["new"]["new+procrustes (gallery)"]["transformed"]
    assert not res["new"]["new+procrustes (query)"]["transformed"]
    assert (ed / "bridges.csv").exists() and "bridges.csv" in json.loads((ed / "artefacts.json").read_text())
    # your own calibration set (`-p calib_ids <file>`): never scored; an overlap with the evaluated ids is refused
    (tmp_path / "calib.txt").write_text("\n".join(ids[y < 4]))
    run = lambda **kw: pm.execute_notebook(
        str(root / "nbs" / "evaluate.ipynb"), str(tmp_path / "out2.ipynb"), kernel_name="python3", cwd=str(root / "nbs"),
        progress_bar=False, execution_timeout=600,
        parameters=dict(protocol="features", old_features=str(tmp_path / "old.npz"), new_features=str(tmp_path / "new.npy"),
                        bridges='["procrustes"]', calib_ids=str(tmp_path / "calib.txt"), refresh_steps=2,
                        refresh_seeds=[0], out_dir=str(tmp_path / "e2"), **kw))
    run()
    (ed2,) = (tmp_path / "e2").iterdir()
    res2 = json.loads((ed2 / "evaluation.json").read_text())
    assert (res2["n_test"], res2["bridges"]["n_calibration"]) == (80, 40) and "calib.txt" in res2["bridges"]["calibration"]
    assert {r["option"]: r for r in res2["bridges"]["tables"]["new"]}["new+procrustes (gallery)"]["gain"] > 0.3
    with pytest.raises(pm.PapermillExecutionError, match="calibration id.*also evaluated"):
        run(protocol_kw={"ids": ids.tolist()})
