"""Tiny benchmark trees in the exact on-disk layouts of data_cards/ (IJB-C, GLDv2, revisitop ROxford5k/RParis6k,
Market-1501) and tiny saved models, shared by the test files (`from benchmark_fixtures import ...`; pytest puts tests/
on sys.path). Images are a few pixels of per-identity colour plus noise, so a random model gives non-trivial rankings."""
import pickle
from pathlib import Path

import numpy as np
from PIL import Image


def _save(path: Path, rgb, size, rng):
    "An RGB image of (W, H) `size`: colour `rgb` plus uniform noise"
    w, h = size
    a = np.clip(np.asarray(rgb, np.float64)[None, None, :] + rng.integers(-60, 61, (h, w, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path, quality=95)


def _colour(rng): return rng.integers(30, 226, 3)


def write_ijbc(root, n_subjects: int = 6, seed: int = 0) -> Path:
    """`root/IJBC/{loose_crop,meta}`: per subject a gallery template (100+s: two images in one media, one in another)
    and a probe template (200+s: two media). G1 = the first half of the subjects, G2 = the rest (disjoint, so every
    probe is mated in one gallery and non-mated in the other). 1:1 pairs: every gallery × probe template (genuine when
    the subject matches) plus gallery × gallery impostors."""
    from bctnb.benchmarks import ARCFACE_TEMPLATE
    rng = np.random.default_rng(seed)
    ij = Path(root)/"IJBC"; (ij/"meta").mkdir(parents=True, exist_ok=True)
    tid_rows, lmk_rows, n1 = [], [], {"G1": [], "G2": [], "probe": []}
    k = 0
    for s in range(1, n_subjects + 1):
        col = _colour(rng)
        for t, media in ((100 + s, (10 * s, 10 * s, 10 * s + 1)), (200 + s, (10 * s + 2, 10 * s + 3))):
            for m in media:
                name = f"img_{k:03d}.jpg"; k += 1
                _save(ij/"loose_crop"/name, col, (48, 48), rng)
                pts = ARCFACE_TEMPLATE * 48 / 112 + rng.normal(0, .5, (5, 2))
                tid_rows.append(f"{name} {t} {m}")
                lmk_rows.append(f"{name} " + " ".join(f"{v:.3f}" for v in pts.ravel()) + f" {rng.uniform(.6, 1):.3f}")
                which = "probe" if t >= 200 else ("G1" if s <= n_subjects // 2 else "G2")
                n1[which].append(f"{t},{s},{name}")
    (ij/"meta"/"ijbc_face_tid_mid.txt").write_text("\n".join(tid_rows) + "\n")
    (ij/"meta"/"ijbc_name_5pts_score.txt").write_text("\n".join(lmk_rows) + "\n")
    subj = range(1, n_subjects + 1)
    pairs = [f"{100 + a} {200 + b} {int(a == b)}" for a in subj for b in subj]
    pairs += [f"{100 + a} {100 + b} 0" for a in subj for b in subj if a < b]
    (ij/"meta"/"ijbc_template_pair_label.txt").write_text("\n".join(pairs) + "\n")
    for key, fn in (("G1", "ijbc_1N_gallery_G1.csv"), ("G2", "ijbc_1N_gallery_G2.csv"), ("probe", "ijbc_1N_probe_mixed.csv")):
        (ij/"meta"/fn).write_text("TEMPLATE_ID,SUBJECT_ID,FILENAME\n" + "\n".join(n1[key]) + "\n")
    return Path(root)


def write_revisited(root, name: str = "roxford5k", n_landmarks: int = 4, per_landmark: int = 3, seed: int = 0) -> Path:
    """`root/gnd_<name>.pkl` + `root/jpg/`: a database of `n_landmarks × per_landmark` images of two sizes (so the images
    cannot be stacked) and one query per landmark with a box; per query the first image of its landmark is easy, the
    second hard, the third junk. A last query has no easy/hard image (excluded from every average)."""
    rng = np.random.default_rng(seed)
    root = Path(root); (root/"jpg").mkdir(parents=True, exist_ok=True)
    imlist, qimlist, gnd = [], [], []
    cols = [_colour(rng) for _ in range(n_landmarks)]
    for l in range(n_landmarks):
        for j in range(per_landmark):
            n = f"{name}_db_{l}_{j}"; imlist.append(n)
            _save(root/"jpg"/f"{n}.jpg", cols[l], (32, 24) if (l + j) % 2 else (24, 32), rng)
    for l in range(n_landmarks + 1):
        n = f"{name}_q_{l}"; qimlist.append(n)
        _save(root/"jpg"/f"{n}.jpg", cols[l % n_landmarks], (40, 30), rng)
        ids = list(range(l * per_landmark, (l + 1) * per_landmark)) if l < n_landmarks else []
        gnd.append({"bbx": [4.4, 3.6, 36.0, 27.5], "easy": ids[:1], "hard": ids[1:2], "junk": ids[2:3]})
    with open(root/f"gnd_{name}.pkl", "wb") as f: pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, f)
    return root


def write_gldv2(root, n_landmarks: int = 4, per_landmark: int = 3, seed: int = 0) -> Path:
    """`root/{index,test}.csv`, `root/retrieval_solution_v2.1.csv` and the images at `<split>/a/b/c/<id>.jpg`: one test
    query per landmark (Private, except the last: Public), a Private query whose relevant id is not in the index
    (excluded), and an Ignored row."""
    from bctnb.benchmarks import gldv2_path
    rng = np.random.default_rng(seed)
    root = Path(root); root.mkdir(parents=True, exist_ok=True)
    cols = [_colour(rng) for _ in range(n_landmarks)]
    index, test, sol = [], [], []
    for l in range(n_landmarks):
        ids = [f"{l:x}{j:x}e{l * per_landmark + j:05x}" for j in range(per_landmark)]
        for i in ids: _save(gldv2_path(root, "index", i), cols[l], (24, 32) if len(index) % 2 else (32, 24), rng); index.append(i)
        q = f"f{l:x}0{l:05x}"; test.append(q); _save(gldv2_path(root, "test", q), cols[l], (30, 30), rng)
        sol.append(f"{q},{' '.join(ids)},{'Public' if l == n_landmarks - 1 else 'Private'}")
    for q, row in (("aa0nothere", "aa0nothere,ffffffff,Private"), ("bb0ignored", "bb0ignored,None,Ignored")):
        test.append(q); _save(gldv2_path(root, "test", q), (128, 128, 128), (30, 30), rng); sol.append(row)
    (root/"index.csv").write_text("id\n" + "\n".join(index) + "\n")
    (root/"test.csv").write_text("id\n" + "\n".join(test) + "\n")
    (root/"retrieval_solution_v2.1.csv").write_text("id,images,Usage\n" + "\n".join(sol) + "\n")
    return root


def write_market1501(root, n_ids: int = 4, seed: int = 0) -> Path:
    """`root/query/` (one image per id, camera 1) and `root/bounding_box_test/` (per id: one same-camera image, which
    the protocol removes, and two other-camera images; plus pid 0000 distractors and pid -1 junk), 16×32 images."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    cols = [_colour(rng) for _ in range(n_ids)]
    for p in range(1, n_ids + 1):
        _save(root/"query"/f"{p:04d}_c1s1_{p:06d}_00.jpg", cols[p - 1], (16, 32), rng)
        for c in (1, 2, 3):
            _save(root/"bounding_box_test"/f"{p:04d}_c{c}s1_{100 + p:06d}_01.jpg", cols[p - 1], (16, 32), rng)
    for j in range(3):
        _save(root/"bounding_box_test"/f"0000_c{j + 1}s2_{j:06d}_01.jpg", (128, 128, 128), (16, 32), rng)
        _save(root/"bounding_box_test"/f"-1_c{j + 1}s3_{j:06d}_01.jpg", (128, 128, 128), (16, 32), rng)
    return root


def save_tiny_model(path, dim: int = 8, seed: int = 0, head_classes: int | None = None, meta: dict | None = None) -> Path:
    "A randomly initialised narrow cpu_resnet saved with bctnb.models.save_model (optionally with a softmax head)"
    import torch
    from bctnb.models import create_backbone, create_head, save_model
    torch.manual_seed(seed)
    bb = create_backbone("cpu_resnet", dim=dim, widths=(8, 8, 16, 16))
    head = create_head("softmax", dim, head_classes) if head_classes else None
    save_model(path, bb, head, meta=meta)
    return Path(path)
