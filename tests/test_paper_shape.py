"""The paper's face path at its real shape, on CPU, two steps each (issue 17): catches shape, dtype and memory faults
of the real path before someone with 8 GPUs does."""
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmark_fixtures import write_ijbc


@pytest.mark.slow
def test_paper_shape_dry_run(tmp_path, monkeypatch):
    """A synthetic MS1MV3 RecordIO in the exact layout (26,000 identities, 112×112 JPEGs, identity records,
    `property`), the paper preset: iResNet-18 old / iResNet-50 new, 512-d ArcFace (s = 64, m = 0.5) over 6,240 old and
    20,800 new identities (extended-class), two steps of train_old and two of train_new with L2, then the IJB-C protocol
    on a synthetic IJB-C in its exact layout. (A prototype method first embeds all 20,800 new training images with the
    old iResNet-18, 10 min on 2 cores, so it is not part of this check.)"""
    from bctnb.benchmarks import write_recordio
    from bctnb.models import load_model
    from bctnb.new_run import new_run_config
    from bctnb.protocols import evaluate_protocol
    from bctnb.runs import Run
    from bctnb.train import TrainConfig, train
    monkeypatch.setenv("BCTNB_DATA", str(tmp_path / "data"))
    buf = io.BytesIO(); Image.fromarray(np.full((112, 112, 3), 128, np.uint8)).save(buf, "JPEG")
    write_recordio(tmp_path / "ms1m" / "train", [(c, buf.getvalue()) for c in range(26_000)], identity_records=True,
                   image_size=112)
    kw = dict(batch_size=8, max_steps=2, device="cpu", nproc=1)
    old = train(TrainConfig.make("paper", "old", dataset="ms1mv3_rec", data_root=str(tmp_path / "ms1m"), **kw),
                root=tmp_path / "runs")
    new = train(new_run_config(old, "l2", preset="paper", scenario="extended-class",
                               method_kw={"old_source": "online"}, **kw), root=tmp_path / "runs")
    (bo, ho, io_), (bn, hn, in_) = load_model(old), load_model(new)
    assert (io_["backbone"]["name"], in_["backbone"]["name"]) == ("iresnet18", "iresnet50")
    assert (ho.kind, ho.num_classes, hn.num_classes, hn.weight.shape[1], hn.s, hn.m) == ("arcface", 6240, 20800, 512, 64.0, 0.5)
    for r in (old, new):
        rows = Run(r).metrics().dropna(subset=["loss"])
        assert Run(r).done and rows["step"].max() == 2 and np.isfinite(rows["loss"]).all()
    write_ijbc(tmp_path / "ijbc")
    ev = evaluate_protocol("ijbc", Path(old) / "model", {"l2": Path(new) / "model"}, data_root=str(tmp_path / "ijbc" / "IJBC"),
                           refresh=False, compat=False)
    tar = ev.table.filter(like="TAR@FAR=0.001")
    assert len(tar.columns) == 3 and np.isfinite(tar.to_numpy(dtype=float)).all()       # old/old, self, cross
