"""Studies on your own images: a folder with one sub-folder per class runs through a study notebook with `-p dataset
folder -p data_root <folder> -p batch_size <n>`; the folder can be named once only, and a batch larger than a training
split is refused before anything trains."""
import json, math
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / "nbs"


def make_folder(root: Path, classes: int = 16, per_class: int = 8, size: int = 32) -> Path:
    "`root/c00/0.png …`: class = colour and the position of a bright square, images differ by noise and a small shift"
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in range(classes):
        col = np.array([(c * 97) % 256, (c * 57 + 80) % 256, (c * 151 + 40) % 256])
        cy, cx = 4 + (c // 4) * 6, 4 + (c % 4) * 6
        (root / f"c{c:02d}").mkdir(parents=True)
        for i in range(per_class):
            im = np.clip(col + rng.normal(0, 12, (size, size, 3)), 0, 255)
            dy, dx = rng.integers(-1, 2, 2)
            im[cy + dy:cy + dy + 8, cx + dx:cx + dx + 8] = 255 - col
            Image.fromarray(im.astype(np.uint8)).save(root / f"c{c:02d}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("own") / "faces")


def test_dataset_args_names_the_folder_once():
    from bctnb.core import ConfigError
    from bctnb.data import dataset_args
    assert dataset_args("folder", "/data/faces", {"size": 32}) == ("/data/faces", {"size": 32})
    assert dataset_args("folder", None, {"root": "/data/faces", "size": 32}) == ("/data/faces", {"size": 32})
    assert dataset_args("emoji", None, None) == (None, {})
    with pytest.raises(ConfigError, match=r"given twice.*pass one of them.*-p data_root"):
        dataset_args("folder", "/a", {"root": "/b"})
    with pytest.raises(ConfigError, match="must be a dict"):
        dataset_args("folder", None, '{"size": 32}')


def test_root_inside_dataset_kw_loads(folder):
    "What used to fail with `load_dataset() got multiple values for keyword argument 'root'`"
    from bctnb.study import plan_study
    from bctnb.train import TrainConfig
    cfg = TrainConfig.make("smoke", "old", dataset="folder", dataset_kw={"root": str(folder), "size": 32},
                           batch_size=16)
    assert (cfg.data_root, cfg.dataset_kw) == (str(folder), {"size": 32})
    cfg.prepare()                                                     # loads the folder and checks the batch
    jobs = plan_study("smoke", ["open-class"], ["l2"], dataset="folder", dataset_kw={"root": str(folder)},
                      batch_size=16)
    assert all(j.config().data_root == str(folder) and j.config().batch_size == 16 for j in jobs)


def test_batch_larger_than_a_split_fails_before_training(folder, tmp_path):
    from bctnb.core import ConfigError
    from bctnb.study import plan_study
    from bctnb.report import reproduce
    jobs = plan_study("smoke", ["open-class"], ["independent"], dataset="folder", data_root=folder, batch_size=64)
    with pytest.raises(ConfigError, match=r"old training split of folder \(open-class.*has 24 images, fewer than one "
                                          r"batch of 64.*-p batch_size 16"):
        reproduce("toobig", jobs, "smoke", "t", out_dir=tmp_path / "report", run_root=tmp_path / "runs")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())     # nothing trained


@pytest.mark.slow
def test_study_notebook_on_an_image_folder(folder, tmp_path):
    import papermill as pm
    out_dir, runs = tmp_path / "report", tmp_path / "runs"
    pm.execute_notebook(str(NBS / "reproduce_unibct.ipynb"), str(tmp_path / "out.ipynb"), kernel_name="python3",
                        cwd=str(NBS), progress_bar=False, execution_timeout=600,
                        parameters=dict(scale="smoke", scenarios=["open-class"], methods=["independent", "l2"],
                                        refresh_methods=[], dataset="folder", data_root=str(folder), batch_size=16,
                                        out_dir=str(out_dir), run_root=str(runs)))
    from bctnb.study import load_results
    df = load_results(out_dir)
    assert sorted(df.method) == ["independent", "l2"]
    for side in ("old/old", "self", "cross"):
        for m in ("mAP", "R@1", "TAR"):
            assert all(math.isfinite(v) and 0 <= v <= 1 for v in df[f"{side}:{m}"]), (side, m, df[f"{side}:{m}"])
    assert (out_dir / "README.md").read_text().startswith("# UniBCT study")
    assert (out_dir / "summary.csv").exists() and (out_dir / "results.csv").exists()
    for f in (out_dir / "runs").glob("*.json"):
        r = json.loads(f.read_text())
        c = r["config"]
        assert (c["dataset"], c["data_root"], c["batch_size"]) == ("folder", str(folder), 16)
        assert r["metrics"]["n_test_classes"] == 3 and r["metrics"]["n_test"] == 24       # 20 % of 16 classes held out
        old = json.loads((runs / r["old_run"] / "config.json").read_text())["config"]  # the old model trained on it
        assert (old["role"], old["dataset"], old["data_root"], old["batch_size"], old["dataset_kw"]) == \
            ("old", "folder", str(folder), 16, {"size": 32})
