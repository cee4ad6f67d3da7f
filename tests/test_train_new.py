"""`nbs/train_new.ipynb`: papermill runs it once (l2 with a method_kw, smoke preset) against the session's shared old
run and it refuses incompatible inputs with a clear error before launching anything. Every registered method trains
through the same trainer in process in tests/test_losses.py::test_every_method_trains_a_few_steps (what the notebook
launches for a method), so a new method does not add a notebook run here."""
import json, os
from pathlib import Path

import pytest

os.environ.setdefault("BCTNB_NO_PROGRESS", "1")
from bctnb.core import ConfigError, NotFoundError
from bctnb.runs import Run
from bctnb.new_run import new_run_config

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / "nbs"
# `old_run` is the session-wide smoke old run of tests/conftest.py; every run here goes into the test's own tmp_path.


def run_nb(tmp_path, **params):
    import papermill as pm
    out = tmp_path / "out.ipynb"                           # never inside nbs/
    return pm.execute_notebook(str(NBS / "train_new.ipynb"), str(out), parameters=params, kernel_name="python3",
                               cwd=str(NBS), progress_bar=False, execution_timeout=600)


def test_notebook_is_parametrised_and_skipped_by_nbdev():
    nb = json.loads((NBS / "train_new.ipynb").read_text())
    assert nb["metadata"]["nbdev"]["skip_exec"] in ("true", True)
    params = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1
    src = "".join(params[0]["source"])
    for p in ("method", "old_run", "dataset", "scenario", "backbone", "head", "dim", "method_kw", "nproc", "seed", "preset"):
        assert f"\n{p} =" in "\n" + src, p


def test_incompatible_old_run_is_refused_before_launch(old_run, tmp_path):
    old = old_run
    with pytest.raises(NotFoundError, match="old run not found"):
        new_run_config(tmp_path / "missing", "l2")
    with pytest.raises(ConfigError, match="was trained on dataset 'synthetic'"):
        new_run_config(old, "l2", dataset="emoji")
    with pytest.raises(ConfigError, match="old part of 'open-data'"):
        new_run_config(old, "l2", scenario="open-data")
    with pytest.raises(ConfigError, match=r"needs the new embedding dim to equal the old one.*projection: bridge_lstsq, bridge_procrustes, bridge_ridge, fct, independent, lce"):
        new_run_config(old, "bct", dim=64)
    with pytest.raises(ConfigError, match="unknown method 'ncl'.*Valid methods:"):
        new_run_config(old, "ncl")
    new = new_run_config(old, "independent", preset="smoke")


@pytest.mark.slow
def test_upgrade_chain_old_v1_v2(tmp_path):
    """Sequential upgrades: old on 30 % of the training classes (extended-class), v1 on the first 60 % of the same class
    order (BCT against old), v2 on all of them (BCT against v1, the current gallery model); one test set throughout,
    and every model pair cross-tests on it (the compatibility matrix)"""
    import numpy as np
    from bctnb.models import load_model
    from bctnb.protocols import PROTOCOLS, evaluate_protocol
    from bctnb.runs import Run
    from bctnb.train import TrainConfig, train
    data = dict(dataset="synthetic", dataset_kw={"num_classes": 60, "per_class": 6})
    old = train(TrainConfig.make("smoke", "old", scenario="extended-class", dim=16, **data), root=tmp_path)
    v1 = train(new_run_config(old, "bct", preset="smoke", new_ratio=0.6), root=tmp_path)
    v2 = train(new_run_config(v1, "bct", preset="smoke"), root=tmp_path)
    maps = [load_model(p)[2]["label_map"] for p in (old, v1, v2)]
    # 60 classes: 12 test, 48 for training: old 14, v1 28 (old's among them), v2 all 48
    assert [len(m) for m in maps] == [14, 28, 48] and set(maps[0]) <= set(maps[1]) <= set(maps[2])
    assert Run(v2).config["old_run"] == str(Path(v1).resolve()) and Run(v2).config["new_ratio"] == 1.0
    ev = evaluate_protocol(PROTOCOLS["cpu_tier"](config=Run(v2).config), Path(old) / "model",
                           {"v1": Path(v1) / "model", "v2": Path(v2) / "model"}, refresh=False)
    C = np.array(ev.compat["C"])                       # row: query model, column: gallery model (earlier ones)
    assert C.shape == (3, 3) and np.isfinite(C[np.tril_indices(3)]).all()
    with pytest.raises(ConfigError, match="not more than the old model's"):      # v1 must see more than old
        new_run_config(old, "bct", preset="smoke", new_ratio=0.2).prepare()


@pytest.mark.slow
def test_papermill_error_is_clear(old_run, tmp_path):
    import papermill as pm
    root = tmp_path / "runs"
    with pytest.raises(pm.PapermillExecutionError, match="Valid methods:"):
        run_nb(tmp_path, method="mixbtc", old_run=str(old_run), preset="smoke", run_root=str(root))
    assert not root.exists() or not any(root.iterdir())   # refused before anything was launched


@pytest.mark.slow
def test_train_new_papermill_l2_with_method_kw(old_run, tmp_path):
    """The notebook end to end, once: parameters injected (method_kw as a JSON string), one new run launched through
    torchrun into run_root, done, and its compat.json (self-test and cross-test retrieval) recorded as an artefact."""
    new_root = tmp_path / "runs"                           # this notebook run's runs only
    nb = run_nb(tmp_path, method="l2", old_run=str(old_run), preset="smoke", run_root=str(new_root), max_steps=2,
                method_kw=json.dumps({"lam": 5.0}))
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in nb.cells)
    new_runs = list(new_root.glob("train_new-*"))
    assert len(new_runs) == 1
    run = Run(new_runs[0])
    assert run.done and run.config["method"] == "l2" and run.config["method_kw"] == {"lam": 5.0}
    assert run.config["old_run"] == str(Path(old_run).resolve())
    assert int(run.metrics()["step"].max()) == 2
    res = json.loads((run.path / "compat.json").read_text())
    assert res["method"] == "l2" and res["method_kw"] == {"lam": 5.0} and Path(res["run"]).resolve() == run.path.resolve()
    for k in ("old/old", "new/new", "new/old"):
        assert 0.0 <= res["retrieval"][k]["mAP"] <= 1.0
    assert "compat.json" in run.artefacts()
    run.verify()


@pytest.mark.slow
def test_train_new_papermill_runs_a_post_training_stage(old_run, tmp_path):
    """A method with a post-training stage (taken from the registry, not named here): the notebook fits its gallery
    transformation after training, records it as an artefact, and cross-tests new queries against h(old gallery)."""
    from bctnb.losses import METHODS, available_methods
    name = next(m for m in available_methods() if METHODS.get(m).has_post_stage())
    new_root = tmp_path / "runs"
    run_nb(tmp_path, method=name, old_run=str(old_run), preset="smoke", run_root=str(new_root), max_steps=2)
    (run_dir,) = new_root.glob("train_new-*")
    run = Run(run_dir)
    h_file = METHODS.get(name).gallery_transform_file()
    assert run.done and (run.path / h_file).exists() and h_file in run.artefacts()
    res = json.loads((run.path / "compat.json").read_text())
    assert 0.0 <= res["retrieval"]["new/h(old)"]["mAP"] <= 1.0 and "new/old" not in res["retrieval"]
    run.verify()
