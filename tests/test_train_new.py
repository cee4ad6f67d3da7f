"""`nbs/train_new.ipynb`: papermill runs it for every method on the smoke preset against one shared old run, and it
refuses incompatible inputs with a clear error before launching anything."""
import json, os
from pathlib import Path

import pytest

os.environ.setdefault("BCTNB_NO_PROGRESS", "1")
from bctnb.core import ConfigError, NotFoundError, Run
from bctnb.losses import available_methods
from bctnb.train import new_run_config

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / "nbs"
DATA = dict(dataset="synthetic", dataset_kw=dict(num_classes=40, per_class=6))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    "One old run (smoke preset, in-process) shared by every papermill run of this module"
    from bctnb.train import TrainConfig, train
    root = tmp_path_factory.mktemp("runs")
    old = train(TrainConfig.make("smoke", "old", **DATA), root=root)
    return root, old


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


def test_incompatible_old_run_is_refused_before_launch(runs, tmp_path):
    root, old = runs
    with pytest.raises(NotFoundError, match="old run not found"):
        new_run_config(tmp_path / "missing", "l2")
    with pytest.raises(ConfigError, match="was trained on dataset 'synthetic'"):
        new_run_config(old, "l2", dataset="emoji")
    with pytest.raises(ConfigError, match="old part of 'open-data'"):
        new_run_config(old, "l2", scenario="open-data")
    with pytest.raises(ConfigError, match=r"needs the new embedding dim to equal the old one.*projection: fct, independent, lce"):
        new_run_config(old, "bct", dim=64)
    with pytest.raises(ConfigError, match="unknown method 'ncl'.*Valid methods:"):
        new_run_config(old, "ncl")
    new = new_run_config(old, "independent", preset="smoke")
    with pytest.raises(ConfigError, match="not an old-model run"):
        from bctnb.train import train
        new_run_config(train(new, root=root), "l2")


@pytest.mark.slow
def test_papermill_error_is_clear(runs, tmp_path):
    import papermill as pm
    root, old = runs
    with pytest.raises(pm.PapermillExecutionError, match="Valid methods:"):
        run_nb(tmp_path, method="mixbtc", old_run=str(old), preset="smoke", run_root=str(root))


@pytest.mark.slow
@pytest.mark.parametrize("method", available_methods())
def test_train_new_papermill_every_method(runs, tmp_path, method):
    root, old = runs
    new_root = tmp_path / "runs"                           # this method's run only
    nb = run_nb(tmp_path, method=method, old_run=str(old), preset="smoke", run_root=str(new_root), max_steps=2,
                method_kw=json.dumps({}) if method != "l2" else json.dumps({"lam": 5.0}))
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in nb.cells)
    new_runs = list(new_root.glob("train_new-*"))
    assert len(new_runs) == 1 and Run(new_runs[0]).config["method"] == method
    run = Run(new_runs[0])
    assert run.done and run.config["old_run"] == str(Path(old).resolve())
    res = json.loads((run.path / "compat.json").read_text())
    cross = "new/h(old)" if method == "fct" else "new/old"
    for k in ("old/old", "new/new", cross):
        assert 0.0 <= res["retrieval"][k]["mAP"] <= 1.0
    if method == "l2": assert run.config["method_kw"] == {"lam": 5.0}
    if method == "fct": assert (run.path / "fct.safetensors").exists()
    run.verify()
