"""The post-training stage hook of `bctnb.losses.Method` (a gallery transformation fitted after the backbone trains, e.g.
FCT's h): the method declares it, and study planning, `evaluate_pair`, `train_new.ipynb` and `evaluate.ipynb` use it
without naming a method."""
import json, os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

os.environ.setdefault("BCTNB_NO_PROGRESS", "1")
from bctnb.core import ConfigError
from bctnb.losses import METHODS, Independent, available_methods, gallery_fn, gallery_transform_of
from bctnb.prototypes import load_artefact, save_artefact

from shared import fake_runs

ROOT = Path(__file__).resolve().parents[1]
CFG = {"dataset": "synthetic", "dataset_kw": {"num_classes": 20, "per_class": 4, "size": 16}, "scenario": "open-class",
       "old_ratio": 0.3, "split_seed": 0, "test_ratio": 0.2}


def _pair(n=256, d_old=6, d_new=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(n, d_old, generator=g)
    return old, old @ torch.randn(d_old, d_new, generator=g)


# ------------------------------------------------------------------------------------------------ the hook itself
def test_only_post_stage_methods_have_one_and_fct_keeps_its_defaults():
    with_post = [n for n in available_methods() if METHODS.get(n).has_post_stage()]
    assert with_post == ["bict", "bridge_lstsq", "bridge_procrustes", "bridge_ridge", "fct"]
    fct = METHODS.get("fct")
    assert fct.trains_as == "independent" and fct.needs_old and not fct.equal_dims
    assert {s: fct.post_stage_epochs(s) for s in ("smoke", "quick", "cpu", "paper")} == {"smoke": 2, "quick": 40, "cpu": 80, "paper": 80}
    assert fct.gallery_transform_file() == "fct.safetensors"
    for n in available_methods():                      # sharing a run means sharing the loss
        c = METHODS.get(n)
        if c.trains_as: assert issubclass(c, METHODS.get(c.trains_as)), n
    l2 = METHODS.get("l2")
    with pytest.raises(NotImplementedError, match="no post-training stage"):
        l2.fit_gallery_transform(*_pair(), epochs=1)
    with pytest.raises(ConfigError, match="no post-training stage"):
        l2.post_stage_epochs("cpu")


def test_fct_post_stage_on_synthetic_features(tmp_path):
    old, new = _pair()
    fct = METHODS.get("fct")
    h = fct.fit_gallery_transform(old, new, epochs=3, seed=0)
    h2 = fct.fit_gallery_transform(old, new, epochs=3, seed=0)
    with torch.no_grad():
        assert torch.equal(h(old), h2(old))                                   # seeded: the same h
        assert h(old).shape == new.shape
    run = tmp_path / "run"; run.mkdir()
    fct.save_gallery_transform(run / fct.gallery_transform_file(), h)
    (run / "config.json").write_text(json.dumps({"config": {"method": "fct"}}))
    tf = gallery_transform_of(run)
    with torch.no_grad(): assert np.array_equal(tf(old.numpy()), h(old).numpy())
    assert np.array_equal(gallery_fn(h)(old.numpy()), tf(old.numpy()))
    assert gallery_transform_of(run, "independent") is None                    # no post stage: nothing loaded
    assert gallery_transform_of(tmp_path / "empty") is None


# ------------------------------------------------------------------------------------ a second method plugs in the same way
class ToyPost(Independent):
    "Toy transformation method: trains as independent, then h = least-squares linear map old → new, L = CE(H(f), y)"
    name = "toy_post"; needs_old = True; equal_dims = False
    trains_as = "independent"
    post_epochs = {"smoke": 1, "quick": 1, "cpu": 1, "paper": 1}

    @classmethod
    def fit_gallery_transform(cls, old_feats, new_feats, epochs, seed=0, **_):
        W = torch.linalg.lstsq(torch.as_tensor(old_feats).float(), torch.as_tensor(new_feats).float()).solution
        h = nn.Linear(W.shape[0], W.shape[1], bias=False); h.weight.data = W.T.contiguous()
        return h.eval()

    @classmethod
    def save_gallery_transform(cls, path, h):
        save_artefact(path, h.state_dict(), {"kind": "toy_post"}); return Path(path)

    @classmethod
    def load_gallery_transform(cls, path):
        sd, _ = load_artefact(path)
        h = nn.Linear(sd["weight"].shape[1], sd["weight"].shape[0], bias=False); h.load_state_dict(sd)
        return h.eval()


@pytest.fixture
def toy_post():
    METHODS.register()(ToyPost)
    yield ToyPost
    METHODS._items.pop("toy_post", None)


def test_a_new_transformation_method_plugs_in_without_naming_it(toy_post, tmp_path):
    from bctnb.protocols import PROTOCOLS, evaluate_protocol, fit_post_stage
    from bctnb.models import create_backbone
    from bctnb.study import default_methods, plan_study
    jobs = plan_study("smoke", ["open-class"], ["independent", "toy_post"])
    ind, toy = jobs[1], jobs[2]
    assert toy.overrides["method"] == "independent" and toy.config().hash() == ind.config().hash()
    assert (ind.post_epochs, toy.post_epochs) == (None, 1) and "toy_post" not in default_methods("smoke")
    torch.manual_seed(0)
    bo, bn = create_backbone("cpu_resnet", dim=8, widths=(8, 8, 8, 8)), create_backbone("cpu_resnet", dim=12, widths=(8, 8, 8, 8))
    run = tmp_path / "run"; run.mkdir()
    f = run / toy_post.gallery_transform_file()
    h = fit_post_stage("toy_post", bo, bn, CFG, epochs=1, path=f, cache_dir=tmp_path / "cache")
    assert f.exists() and isinstance(h, nn.Linear) and h.weight.shape == (12, 8)
    (run / "config.json").write_text(json.dumps({"config": {"method": "toy_post"}}))
    tf = gallery_transform_of(run)
    pr = evaluate_protocol(PROTOCOLS["cpu_tier"](config=CFG), bo, {"toy": bn}, gallery_transforms={"toy": tf},
                           refresh=False, compat=False, cache_dir=tmp_path / "cache")
    assert pr.new["toy"]["transformed"] and 0.0 <= pr.new["toy"]["cross"]["mAP"] <= 1.0


# ------------------------------------------------------------------------------ evaluate_pair: the study's evaluation
def test_evaluate_pair_runs_the_method_post_stage_and_caches_it(tmp_path, monkeypatch):
    from bctnb.models import load_model
    from bctnb.study import evaluate_pair
    from bctnb.train import TrainConfig
    monkeypatch.setenv("BCTNB_DATA", str(tmp_path / "data"))
    old, (new,) = fake_runs(tmp_path / "runs", methods=("independent",))
    cfg = TrainConfig.from_dict({**new.config, "old_run": str(old.path)})
    plain = evaluate_pair(old.path, new.path, cfg)                          # cfg.method = independent: no post stage
    assert plain["gallery"] == "old" and not list(new.path.glob("fct-*"))
    got = evaluate_pair(old.path, new.path, cfg, method="fct", post_epochs=1)
    sha = load_model(old.path / "model", verify=False)[2]["sha256"]
    cache = new.path / f"fct-{sha[:12]}-e1-s{cfg.seed}.safetensors"           # the study's cache name, unchanged
    assert got["gallery"] == "h(old)" and cache.exists()
    assert got["self"] == plain["self"] and got["old/old"] == plain["old/old"]
    mtime = cache.stat().st_mtime_ns
    again = evaluate_pair(old.path, new.path, cfg, method="fct", post_epochs=1)
    assert again == got and cache.stat().st_mtime_ns == mtime               # reloaded, not refitted


def test_post_stage_settings_come_from_the_spec_and_name_the_cached_file(tmp_path, monkeypatch):
    """BiCT trains as BCT (one backbone); its ψ objective is a post-stage setting read from the method spec: each
    objective gets its own cached ψ file, and the CE objective, which needs the new head, says so when there is none"""
    from bctnb.study import evaluate_pair
    from bctnb.train import TrainConfig
    monkeypatch.setenv("BCTNB_DATA", str(tmp_path / "data"))
    old, (new,) = fake_runs(tmp_path / "runs", methods=("bct",))
    cfg = TrainConfig.from_dict({**new.config, "old_run": str(old.path)})
    got = evaluate_pair(old.path, new.path, cfg, method="bict:psi=regress", post_epochs=1, mechanism=False)
    (f,) = new.path.glob("bict-*.safetensors")
    assert got["gallery"] == "h(old)" and f.stem.endswith(tuple("0123456789abcdef")) and f.stem.count("-") == 4
    with pytest.raises(ConfigError, match="needs the new model's head"):       # fake new models have no head
        evaluate_pair(old.path, new.path, cfg, method="bict", post_epochs=1, mechanism=False)


# ---------------------------------------------------------------------- the pipelines never test for a method name
@pytest.mark.parametrize("nb", ["train_new.ipynb", "evaluate.ipynb", "08_study.ipynb"])
def test_pipelines_do_not_special_case_fct(nb):
    cells = json.loads((ROOT / "nbs" / nb).read_text())["cells"]
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    for bad in ('== "fct"', "== 'fct'", "fct_epochs", "FCT_EPOCHS", "load_fct", "train_fct", "fct.safetensors"):
        assert bad not in code, (nb, bad)
# evaluate.ipynb cross-testing an FCT run through the h it saved, with no FCT-specific code: one papermill run in
# test_evaluate.test_evaluate_notebook_papermill, next to the other methods.
