"""bctnb.fonts: typeface families as identities. A small build from real npm packages runs in CI (a few pinned
families, copies and determinism); the full build from nothing, checked against its data card, is marked `dataset`
(a ~500 MB npm download: `make test-data`)."""
import json, re, shutil
from pathlib import Path

import numpy as np
import pytest

import bctnb.fonts as F
from bctnb.core import IntegrityError, NotFoundError
from bctnb.data import load_dataset

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["@fontsource/abeezee", "@fontsource/alegreya", "@fontsource/amiri", "@fontsource/amiri-quran",
         "@fontsource/anton", "@fontsource/cardo"]          # amiri-quran draws Amiri's Latin glyphs: a renamed copy


@pytest.fixture
def small(monkeypatch):
    if shutil.which("npm") is None:
        pytest.fail("npm is needed to build the fonts set (CI has node + npm); install Node.js")
    pk = F.font_packages()
    sub = {p: pk[p] for p in SMALL}
    monkeypatch.setattr(F, "font_packages", lambda: sub)
    return sub


@pytest.fixture(scope="module")
def downloads(tmp_path_factory):
    "The six tarballs, downloaded once for this module (verified against their npm integrity hashes)"
    from bctnb.emoji import fetch_npm
    pk = F.font_packages()
    d = tmp_path_factory.mktemp("font_downloads")
    fetch_npm({p: pk[p] for p in SMALL}, d, "fonts")
    return d


def _home(folder, downloads):
    "A fonts home under `folder` holding a copy of the downloaded tarballs"
    shutil.copytree(downloads, folder / "fonts" / "downloads")
    return folder / "fonts"


@pytest.mark.slow
def test_small_build_is_deterministic_drops_copies_and_loads(small, downloads, tmp_path):
    home = _home(tmp_path, downloads)
    man = json.loads(F.build_fonts(home, workers=2, download=False).read_text())
    assert man["dropped"]["copies"] == {"@fontsource/amiri-quran": "@fontsource/amiri"}
    assert man["counts"]["families"] == 5 and man["renderer"]["pillow"] == F.FONTS_PILLOW
    ds = load_dataset("fonts", root=home, build=False)
    assert tuple(ds.images.shape[1:]) == (3, 32, 32) and ds.num_classes == 5
    assert (ds.images[:, 0] == ds.images[:, 2]).all()                          # grey in three equal channels
    per = np.bincount(ds.labels)
    assert per.min() >= 30 and per.sum() == man["counts"]["images"] == len(set(ds.keys))
    assert set(ds.meta["face"]) <= {"400n", "700n", "400i", "700i"} | {f"{w}{s}" for w in range(100, 1000, 100) for s in "ni"}
    assert all(len(t) == 4 for t in ds.meta["text"])
    # the same packages give the same bytes: one worker, another folder
    home2 = _home(tmp_path / "again", downloads)
    man2 = json.loads(F.build_fonts(home2, workers=1, download=False).read_text())
    assert man2["sha256"] == man["sha256"] and man2["content_sha256"] == man["content_sha256"]


@pytest.mark.slow
def test_missing_or_damaged_tarballs_are_clear_errors(small, downloads, tmp_path, monkeypatch):
    home = tmp_path / "fonts"
    with pytest.raises(NotFoundError, match=r"source tarballs missing .* download=True"):
        F.build_fonts(home, download=False)
    with pytest.raises(NotFoundError, match=r"no build with these parameters .*load_fonts\(build=True\)"):
        F.load_fonts(home, build=False)
    home = _home(tmp_path / "damaged", downloads)
    f = home / "downloads" / "fontsource-anton-5.3.0.tgz"
    f.write_bytes(f.read_bytes()[:-10])                       # truncated: not accepted, fetched again (here: no npm)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(NotFoundError, match=r"1 source packages \(@fontsource/anton\).*`npm` is not on PATH.*npm pack "
                                            r"@fontsource/anton@5.3.0"):
        F.build_fonts(home)
    assert len(list((home / "downloads").glob("*.tgz"))) == len(SMALL)      # nothing deleted


@pytest.mark.dataset
def test_fonts_build_from_nothing_matches_its_card(tmp_path):
    "The full set from nothing (npm download of the pinned packages, render, dedupe), checked against data_cards/fonts.md"
    ds = load_dataset("fonts", root=tmp_path / "fonts")
    man = ds.manifest
    text = (ROOT / "data_cards" / "fonts.md").read_text()
    block = re.search(r"<!-- counts -->(.*?)<!-- /counts -->", text, re.S).group(1)
    card = {k.strip(): v.strip() for k, v in (l.split(":", 1) for l in block.splitlines() if ":" in l and "```" not in l)}
    c = man["counts"]
    built = {"families": c["families"], "images": c["images"], "faces": c["faces"],
             "images per family (median)": c["images per family (median)"],
             "images per family (min)": c["images per family (min)"],
             **{f"families with {k} faces": v for k, v in c["families_by_faces"].items()},
             "renamed copies dropped": len(man["dropped"]["copies"]), "content sha256": man["content_sha256"]}
    assert card == {k: str(v) for k, v in built.items()}
    assert man["seconds"]["total"] - man["seconds"]["download"] < 600          # build ≤ 10 min on 2 cores
