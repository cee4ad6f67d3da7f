"""bctnb.data: the emoji set builds from nothing and matches its card, RecordIO files round-trip and report corruption
precisely, the four split scenarios keep their invariants, and missing datasets say where to get them."""
import io, json, os, re, shutil, struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bctnb.core import ConfigError, IntegrityError, NotFoundError
from bctnb.benchmarks import (RECORDIO_MAGIC, RecordIODataset, RecordIOReader, encode_recordio, pack_record, unpack_record,
                              write_recordio)
from bctnb.data import DATASETS, Split, load_dataset, make_split
from bctnb.emoji import EMOJI_STYLES, load_emoji

ROOT = Path(__file__).resolve().parents[1]
MAGIC = struct.pack("<I", RECORDIO_MAGIC)


# ---------------------------------------------------------------- emoji (downloads ~164 MB with npm: slow, runs in CI)
def _card_counts(path: Path) -> dict:
    "The `key: value` lines between <!-- counts --> and <!-- /counts --> in a data card"
    text = path.read_text()
    m = re.search(r"<!-- counts -->(.*?)<!-- /counts -->", text, re.S)
    assert m, f"{path} has no <!-- counts --> block"
    out = {}
    for line in m.group(1).splitlines():
        if ":" in line and not line.strip().startswith("```"):
            k, v = line.split(":", 1)
            out[k.strip()] = int(v.strip().replace(",", ""))
    return out


@pytest.fixture(scope="module")
def emoji_home(emoji_data):
    if shutil.which("npm") is None:
        pytest.fail("npm is needed to build the emoji set (CI has node + npm); install Node.js")
    return emoji_data


@pytest.mark.slow
def test_emoji_builds_from_nothing_matches_its_card_and_reuses_its_cache(emoji_home, tmp_path, tmp_path_factory):
    """One test, not two: the cache checks need the build. The folder is new for this pytest run (conftest `emoji_data`),
    so the set was built from nothing in this run, by this test or by another test of the run that asked first."""
    ds = load_dataset("emoji")                                   # default root: $BCTNB_DATA/emoji
    man = ds.manifest
    man_path = next((emoji_home / "emoji").glob("emoji-32px-*.json"))
    assert emoji_home.is_relative_to(tmp_path_factory.getbasetemp().parent)   # a folder of this run: built in it
    assert len(list((emoji_home / "emoji" / "downloads").glob("*.tgz"))) == len(man["packages"])  # from npm tarballs
    assert (emoji_home / "emoji" / man["file"]).exists()
    # the contract the CPU tier relies on
    assert ds.images.dtype == torch.uint8 and tuple(ds.images.shape[1:]) == (3, 32, 32)
    per_class = np.bincount(ds.labels)
    assert ds.num_classes >= 1000 and per_class.min() >= 5
    assert sorted(set(ds.meta["style"].tolist())) == sorted(EMOJI_STYLES)
    assert len(set(ds.keys)) == len(ds)
    # the card states exactly what was built
    card = _card_counts(ROOT / "data_cards" / "emoji.md")
    built = {"classes": ds.num_classes, "images": len(ds), "styles": len(EMOJI_STYLES),
             **{f"classes with {k} styles": int((per_class == int(k)).sum()) for k in man["counts"]["classes_by_styles"]},
             **{f"images {s}": int((ds.meta["style"] == s).sum()) for s in EMOJI_STYLES}}
    assert card == built
    # flags and skin-tone swatches are gone; every package is pinned and hashed
    assert man["dropped"]["flag_classes"] > 200 and man["dropped"]["component_classes"] == 5
    assert all(len(p["sha256"]) == 64 and p["version"] for p in man["packages"].values())

    # the cache is reused (no rebuild) and verified (a corrupted file is refused)
    npz = man_path.with_suffix(".npz")
    mtime = npz.stat().st_mtime_ns
    again = load_emoji()                                         # built above: read from the cache
    assert npz.stat().st_mtime_ns == mtime and torch.equal(again.images, ds.images)
    again = load_emoji(build=False)                              # no rebuild: same file, same content
    assert npz.stat().st_mtime_ns == mtime and torch.equal(again.images, ds.images)
    copy = tmp_path / "emoji"                                   # damage a copy: other workers read the shared cache
    copy.mkdir()
    shutil.copy(man_path, copy); data = bytearray(npz.read_bytes()); data[-100] ^= 0xFF
    (copy / npz.name).write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="does not match the sha256"):
        load_emoji(root=copy, build=False)

    # last, so that a slow machine does not hide the checks above
    assert man["seconds"]["total"] - man["seconds"]["download"] < 90       # ~20 s on 2 idle cores; guards gross regressions


def test_emoji_without_npm_or_tarballs_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(NotFoundError) as e:
        load_emoji(root=tmp_path / "emoji")
    msg = str(e.value)
    assert "npm" in msg and "npm pack emoji-datasource-google@16.0.0" in msg and str(tmp_path / "emoji" / "downloads") in msg
    with pytest.raises(NotFoundError, match="no 32px build"):
        load_emoji(root=tmp_path / "emoji", build=False)


# ---------------------------------------------------------------- RecordIO
def _jpeg(rgb, size=16) -> bytes:
    b = io.BytesIO(); Image.new("RGB", (size, size), rgb).save(b, "JPEG", quality=95); return b.getvalue()


def test_recordio_round_trip_with_magic_word_and_header(tmp_path):
    rng = np.random.default_rng(0)
    payloads = [rng.bytes(int(n)) for n in rng.integers(1, 300, 20)]
    payloads[3] = MAGIC + b"head"                                 # magic at the start of the payload (offset 24 in the record)
    payloads[7] = b"abcd" + MAGIC + MAGIC + b"efgh" + MAGIC         # consecutive and trailing magic words
    payloads[9] = b"ab" + MAGIC + b"cd"                           # unaligned: not a part boundary
    items = sorted(zip(rng.integers(0, 5, 20).tolist(), payloads), key=lambda t: t[0])
    rec, idx = write_recordio(tmp_path / "train", items)
    r = RecordIOReader(rec)
    flag, lab, id_, id2, body = r.header(0)
    assert flag == 2 and lab.tolist() == [21.0, 21.0] and body == b""        # record 0: label[0] = N + 1
    for k, (c, b) in enumerate(items, start=1):
        f, l, i, i2, p = r.header(k)
        assert (f, l, i, i2, p) == (0, float(c), k, 0, b)
    # the idx is "key<TAB>offset" and every offset points at a magic word
    raw = rec.read_bytes()
    for line in idx.read_text().splitlines():
        k, off = map(int, line.split("\t"))
        assert raw[off:off + 4] == MAGIC
    # a payload with aligned magic words is written in parts: first 1, middle 2, last 3
    logical = pack_record(0, 1.0, 5, 0, b"abcd" + MAGIC + MAGIC + b"efgh" + MAGIC)
    phys = encode_recordio(logical)
    cflags = []
    off = 0
    while off < len(phys):
        magic, lrec = struct.unpack_from("<II", phys, off); assert magic == RECORDIO_MAGIC
        cflags.append(lrec >> 29); n = lrec & ((1 << 29) - 1); off += 8 + n + (-n % 4)
    assert cflags == [1, 2, 2, 3]
    assert unpack_record(logical)[-1] == b"abcd" + MAGIC + MAGIC + b"efgh" + MAGIC


def test_recordio_dataset_header_semantics_and_workers(tmp_path):
    colours = {0: (250, 0, 0), 1: (0, 250, 0), 2: (0, 0, 250)}
    items = [(c, _jpeg(colours[c])) for c in (0, 0, 1, 2, 2, 2)]
    for ident in (False, True):
        write_recordio(tmp_path / f"t{int(ident)}", items, identity_records=ident)
        ds = RecordIODataset(tmp_path / f"t{int(ident)}.rec")
        assert ds.keys == ["1", "2", "3", "4", "5", "6"]          # record 0 and identity records are not images
        assert ds.labels.tolist() == [0, 0, 1, 2, 2, 2]
    r = RecordIOReader(tmp_path / "t1.rec")
    assert r.header(0)[1].tolist() == [7.0, 10.0]                   # [N + 1, N + 1 + C]
    assert [r.header(k)[1].tolist() for k in (7, 8, 9)] == [[1, 3], [3, 4], [4, 7]]
    # flag-0 record 0: every key is an image (arcface_torch fallback)
    with open(tmp_path / "plain.rec", "wb") as f:
        offs = []
        for k, (c, b) in enumerate(items):
            offs.append(f.tell()); f.write(encode_recordio(pack_record(0, float(c), k, 0, b)))
    (tmp_path / "plain.idx").write_text("".join(f"{k}\t{o}\n" for k, o in enumerate(offs)))
    plain = RecordIODataset(tmp_path / "plain.rec")
    assert plain.keys == [str(k) for k in range(6)] and plain.labels.tolist() == [0, 0, 1, 2, 2, 2]
    # pixels come out RGB (not BGR), also from forked DataLoader workers that open their own handle
    ds = RecordIODataset(tmp_path / "t0.rec")
    ds[0]                                                           # open the file in the parent first
    dl = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, multiprocessing_context="fork")
    imgs, labels, index = map(torch.cat, zip(*dl))
    assert labels.tolist() == [0, 0, 1, 2, 2, 2] and index.tolist() == list(range(6))
    dominant = imgs.float().mean((2, 3)).argmax(1)
    assert dominant.tolist() == labels.tolist()


def test_recordio_corruption_names_record_and_offset(tmp_path):
    items = [(0, _jpeg((9, 9, 9))), (1, _jpeg((99, 9, 9))), (2, _jpeg((9, 99, 9)))]
    rec, _ = write_recordio(tmp_path / "train", items)
    r = RecordIOReader(rec)
    good = rec.read_bytes()
    off2 = r.offsets[2]
    bad = bytearray(good); bad[off2 + 1] ^= 0x55
    rec.write_bytes(bytes(bad))
    with pytest.raises(IntegrityError, match=rf"record 2 at byte offset {off2}: bad magic"):
        RecordIOReader(rec).read(2)
    assert RecordIOReader(rec).header(1)[-1] == items[0][1]          # other records still read
    off3 = r.offsets[3]
    rec.write_bytes(good[:off3 + 20])
    with pytest.raises(IntegrityError, match=rf"record 3 is truncated at byte offset {off3}"):
        RecordIOReader(rec).read(3)
    rec.write_bytes(good[:off3 + 4])
    with pytest.raises(IntegrityError, match=rf"record 3 is truncated at byte offset {off3}"):
        RecordIOReader(rec).read(3)
    # a record whose bytes are intact but whose image is not a JPEG
    write_recordio(tmp_path / "junk", [(0, b"not a jpeg at all")])
    with pytest.raises(IntegrityError, match="record 1: cannot decode"):
        RecordIODataset(tmp_path / "junk.rec")[0]


# ---------------------------------------------------------------- splits
def _labels(seed, C=60):
    rng = np.random.default_rng(seed)
    return np.repeat(rng.permutation(np.arange(1000, 1000 + C)), rng.integers(1, 12, C))   # uneven, incl. singletons


@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize("scenario", ["open-class", "open-data", "extended-class", "extended-data"])
def test_split_invariants(scenario, seed):
    labels = _labels(seed)
    r, t = 0.3, 0.2
    sp = make_split(labels, scenario, old_ratio=r, seed=seed, test_ratio=t)
    C = len(np.unique(labels))
    test_cls, old_cls, new_cls = (set(sp.classes(w).tolist()) for w in ("test", "old", "new"))
    # test classes carved first, held out of both training sets, with all their images
    assert len(test_cls) == int(np.floor(t * C))
    assert not test_cls & (old_cls | new_cls)
    assert set(sp.test.tolist()) == set(np.flatnonzero(np.isin(labels, list(test_cls))).tolist())
    train = set(range(len(labels))) - set(sp.test.tolist())
    old, new = set(sp.old.tolist()), set(sp.new.tolist())
    C_train = C - len(test_cls)
    if scenario.endswith("-class"):
        assert len(old_cls) == int(np.floor(r * C_train))
        assert old == set(np.flatnonzero(np.isin(labels, list(old_cls))).tolist())    # all images of the old classes
    else:
        assert old_cls == new_cls
        for c in old_cls | new_cls:
            n = int((labels == c).sum())
            k = int(np.isin(sp.old, np.flatnonzero(labels == c)).sum())
            assert k == (1 if n == 1 else max(1, round(r * n)))
    if scenario == "open-class":
        assert not old & new and not old_cls & new_cls and old | new == train
    if scenario == "open-data":
        singles = {i for i in train if (labels == labels[i]).sum() == 1}
        assert old & new == singles and old | new == train
    if scenario.startswith("extended"):
        assert old < new and new == train
    # contiguous labels for each training split, mapping back to global labels
    for w in ("old", "new"):
        sl = sp.split_labels(w)
        assert sl.min() == 0 and sl.max() == len(sp.classes(w)) - 1
        assert np.array_equal(sp.label_map(w)[sl], labels[sp.indices(w)])
    # deterministic in the seed, different across seeds
    again = make_split(labels, scenario, old_ratio=r, seed=seed, test_ratio=t)
    assert all(np.array_equal(getattr(sp, w), getattr(again, w)) for w in ("test", "old", "new"))
    other = make_split(labels, scenario, old_ratio=r, seed=seed + 100, test_ratio=t)
    assert not np.array_equal(sp.test, other.test) or not np.array_equal(sp.old, other.old)


def test_split_files_round_trip_and_are_byte_identical(tmp_path):
    labels = _labels(3)
    keys = [f"img/{i:05d}.jpg" for i in range(len(labels))]
    for scenario in ("open-class", "extended-data"):
        sp = make_split(labels, scenario, seed=5, keys=keys)
        sp.save(tmp_path / "a", scenario); make_split(labels, scenario, seed=5, keys=keys).save(tmp_path / "b", scenario)
        for f in (tmp_path / "a").glob(f"{scenario}*"):
            assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes()
        back = Split.load(tmp_path / "a", scenario, keys=keys)
        assert back.hash() == sp.hash() and np.array_equal(back.split_labels("new"), sp.split_labels("new"))
        rows = (tmp_path / "a" / f"{scenario}.old.tsv").read_text().splitlines()
        assert rows == sorted(rows) and all(len(r.split("\t")) == 3 for r in rows)
        man = json.loads((tmp_path / "a" / f"{scenario}.json").read_text())
        assert man["counts"]["old"]["images"] == len(sp.old) and man["seed"] == 5


def test_split_bad_requests_are_clear():
    labels = np.repeat(np.arange(10), 3)
    with pytest.raises(ConfigError, match="scenario='closed-class' is not valid; choose one of: open-class, open-data"):
        make_split(labels, "closed-class")
    for bad in (0, 1, -0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="old_ratio"):
            make_split(labels, "open-class", old_ratio=bad)
    with pytest.raises(ConfigError, match="test_ratio"):
        make_split(labels, "open-class", test_ratio=1)
    with pytest.raises(ConfigError, match="need at least 1 old and 1 new class"):
        make_split(np.repeat(np.arange(3), 2), "open-class", test_ratio=0)
    with pytest.raises(ConfigError, match="0 classes"):
        make_split(np.repeat(np.arange(4), 2), "open-class", test_ratio=0.2)
    with pytest.raises(ConfigError, match="single image"):
        make_split(np.array([0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]), "open-data", test_ratio=0, singletons="error")
    with pytest.raises(ConfigError, match="keys must be unique"):
        make_split(labels, "open-class", keys=["a"] * 30)


# ---------------------------------------------------------------- missing datasets
@pytest.mark.parametrize("name", ["folder", "ms1mv3_rec", "ijbc", "gldv2", "roxford5k", "rparis6k", "market1501"])
def test_missing_dataset_says_where_and_which_layout(name, tmp_path):
    with pytest.raises(NotFoundError) as e:
        load_dataset(name, root=tmp_path / "not-here")
    msg = str(e.value)
    assert "Expected layout" in msg and str(tmp_path / "not-here") in msg
    if name != "folder": assert "Get the data" in msg
    lines = e.value._render_traceback_()                 # how a notebook shows it: one line, no traceback wall
    assert len(lines) == 1 and "\n" not in lines[0]
    with pytest.raises(ConfigError, match="pass root="):
        load_dataset(name)


def test_registry_lists_every_dataset():
    assert {"emoji", "folder", "ms1mv3_rec", "ijbc", "gldv2", "roxford5k", "rparis6k", "market1501"} <= set(DATASETS.names())
    with pytest.raises(ConfigError, match="Did you mean 'emoji'"):
        load_dataset("emoj")


def test_recordio_label_cache_is_written_whole_and_reread(tmp_path, monkeypatch):
    """A .rec of more than 10,000 images caches its labels: a second open reads the cache (it used to hold an empty
    file, np.save having written to '<tmp>.npy' beside it); a damaged cache is rebuilt, not fatal"""
    monkeypatch.setenv("BCTNB_DATA", str(tmp_path / "data"))
    buf = io.BytesIO(); Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(buf, "JPEG")
    items = [(c // 2, buf.getvalue()) for c in range(10_010)]
    write_recordio(tmp_path / "big", items, identity_records=True)
    first = RecordIODataset(tmp_path / "big.rec").labels
    (cache,) = (tmp_path / "data" / "recordio").glob("labels-*.npy")
    assert cache.stat().st_size > 10_010 * 8 and not [p for p in cache.parent.iterdir() if p != cache]
    assert np.array_equal(RecordIODataset(tmp_path / "big.rec").labels, first)
    cache.write_bytes(b"")                                        # damaged: rebuilt from the records
    assert np.array_equal(RecordIODataset(tmp_path / "big.rec").labels, np.arange(10_010) // 2)
