"""The reproduction studies end to end at the smoke scale: papermill runs each reproduce notebook, a report is
rendered from per-run result files, and a re-run skips finished runs."""
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / "nbs"


def _papermill(nb, out, **params):
    import papermill as pm
    return pm.execute_notebook(str(NBS / nb), str(out), parameters=params, kernel_name="python3", cwd=str(NBS),
                               progress_bar=False, execution_timeout=1200)


@pytest.fixture
def runs(smoke_runs):
    return smoke_runs


# One scenario each, the two default ones of the smoke/quick scale between them, and the same models where the studies
# overlap (trained once, in the shared run root): what a study notebook adds to the library is its plan, its report and
# its figures. Every method's training is tested in process (test_losses.test_every_method_trains_a_few_steps).
_SMOKE3 = ["independent", "bct", "ract"]
STUDIES = [
    ("reproduce_unibct.ipynb", dict(scenarios=["extended-class"], methods=_SMOKE3, refresh_methods=["bct", "ract"])),
    ("reproduce_mixbct.ipynb", dict(methods=["independent", "mixbct"])),
    ("reproduce_hot_refresh.ipynb", dict(scenarios=["open-class"], methods=_SMOKE3 + ["bridge_procrustes"],
                                         refresh_methods=_SMOKE3 + ["bridge_procrustes"])),   # a post-stage method
]


@pytest.mark.slow
@pytest.mark.parametrize("nb,params", STUDIES, ids=[s[0] for s in STUDIES])
def test_reproduce_notebook_smoke(nb, params, tmp_path, runs):
    out_dir = tmp_path / "report"
    _papermill(nb, tmp_path / "out.ipynb", scale="smoke", dataset="synthetic", dataset_kw={"num_classes": 40, "per_class": 6}, out_dir=str(out_dir), run_root=str(runs), **params)
    results = sorted((out_dir / "runs").glob("*.json"))
    from bctnb.study import load_results
    df = load_results(out_dir)
    assert len(results) == len(df) > 0
    assert set(df.method) == set(params["methods"])
    for side in ("old/old", "self", "cross"):
        assert df[f"{side}:mAP"].between(0, 1).all()
    readme = (out_dir / "README.md").read_text()
    assert "## Verdicts" in readme and "## Environment and cost" in readme
    # every result carries its mechanism diagnostics, and the report prints them
    mech = [json.loads(f.read_text())["metrics"]["mechanism"] for f in results]
    assert all(m["norm_ratio"] > 0 for m in mech)
    assert "## Did the mechanism act" in readme and "| acted |" in readme
    assert (out_dir / "summary.csv").exists() and (out_dir / "cross_mAP.png").stat().st_size > 1000
    if "refresh_methods" in params:
        assert (out_dir / "hot_refresh.png").exists()
        r = json.loads(results[0].read_text())
        refreshed = [json.loads(f.read_text()) for f in results if "refresh" in json.loads(f.read_text())["metrics"]]
        assert {x["method"] for x in refreshed} == set(params["refresh_methods"]) & set(params["methods"])
        curves = refreshed[0]["metrics"]["refresh"]["curves"]
        assert sorted(set(curves["beta"])) == [i / 10 for i in range(11)]


@pytest.mark.slow
def test_rerun_skips_finished_runs(tmp_path, runs, capsys):
    from bctnb.study import plan_study, run_study
    jobs = plan_study("smoke", ["open-class"], ["independent", "l2"], dataset="synthetic", dataset_kw={"num_classes": 40, "per_class": 6})
    first = run_study("skiptest", jobs, tmp_path, runs, workers=2)
    stamps = {f.name: f.stat().st_mtime_ns for f in (tmp_path / "runs").glob("*.json")}
    assert len(first) == 2 and len(stamps) == 2
    capsys.readouterr()
    second = run_study("skiptest", jobs, tmp_path, runs, workers=2)
    assert "0 new model(s)" in capsys.readouterr().out
    assert {f.name: f.stat().st_mtime_ns for f in (tmp_path / "runs").glob("*.json")} == stamps
    assert second.equals(first)


@pytest.mark.slow
def test_reproduce_checks_against_reference(tmp_path, runs):
    """`make reproduce`'s check: a second study of the same jobs in another folder, compared run by run with the first.
    The folders have different parents, so the second evaluates the (already trained) models itself instead of copying
    the first one's result files; evaluation is deterministic, so every number must match."""
    from bctnb.core import ConfigError
    from bctnb.study import plan_study
    from bctnb.report import reproduce
    jobs = plan_study("smoke", ["open-class"], ["independent", "l2"], dataset="synthetic", dataset_kw={"num_classes": 40, "per_class": 6})
    ref, again = tmp_path / "a" / "ref", tmp_path / "b" / "again"
    reproduce("reftest", jobs, "smoke", "ref", out_dir=ref, run_root=runs)
    readme = reproduce("reftest", jobs, "smoke", "again", out_dir=again, run_root=runs, reference=ref).read_text()
    assert "## Reproduction check against" in readme and "2 of 2 runs here" in readme, readme
    assert "18 of 18 numbers are identical" in readme and "reproduced exactly" in readme, readme
    assert "reused_from" not in (again / "runs" / sorted(p.name for p in (again / "runs").glob("*.json"))[0]).read_text()
    assert (again / "reference_check.csv").exists()
    with pytest.raises(ConfigError, match="own folder"):
        reproduce("reftest", jobs, "smoke", "ref", out_dir=ref, run_root=runs, reference=ref)


# ---------------------------------------------------------------- the model zoo (reports/model_zoo.json, in git history)
L2_PAIR = "l2_open-class_softmax128_s0-*.json"       # the seed-0 L2 pair of the UniBCT study (open-class)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """The L2 pair restored the way the README says, `make zoo ZOO_IDS=...`: from this clone's git history into a
    cache folder ($BCTNB_ZOO), every file checked against its sha256"""
    import os, subprocess
    r = json.loads(next((ROOT / "reports" / "unibct_cpu" / "runs").glob(L2_PAIR)).read_text())
    dest = tmp_path_factory.mktemp("zoo")
    p = subprocess.run(["make", "-s", "zoo", f"ZOO_IDS={r['new_run']}"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "BCTNB_ZOO": str(dest)}, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return dest


def test_model_zoo_index_covers_the_committed_seed0_models():
    "Every zoo entry names a commit, a path and a sha256 per file; every seed-0 model of unibct_cpu is in it"
    from bctnb.study import zoo_index
    idx = zoo_index(ROOT)
    assert len(idx) == 65
    for rid, e in idx.items():
        assert len(e["commit"]) == 40 and e["path"].startswith("reports/model_zoo/"), rid
        assert {"config.json", "model/backbone.safetensors", "model/model.json"} <= set(e["files"]), rid
    for f in (ROOT / "reports" / "unibct_cpu" / "runs").glob("*_s0-*.json"):
        r = json.loads(f.read_text())
        assert r["new_run"] in idx and r["old_run"] in idx, f.name


def test_zoo_restores_into_run_folders_named_by_their_run_ids(zoo):
    "A restored folder is a finished run whose id, recomputed from its config, is its folder name"
    from bctnb.runs import Run
    from bctnb.models import load_model
    from bctnb.train import TrainConfig
    dirs = sorted(p for p in zoo.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [d.name.split("-")[0] for d in dirs] == ["train_new", "train_old"]   # a new model brings its old model
    for d in dirs:
        assert Run(d).done and TrainConfig.from_dict(Run(d).config).run_id == d.name
        load_model(d, verify=True)                                     # weights match the sha256 in model.json


@pytest.mark.slow
def test_model_zoo_pair_reproduces_the_committed_numbers(zoo, emoji_data):
    "Evaluating the zoo's seed-0 L2 pair (open-class) from its weights gives the numbers in reports/unibct_cpu"
    from bctnb.zoo import check_zoo_entry
    f = next((ROOT / "reports" / "unibct_cpu" / "runs").glob(L2_PAIR))
    got = check_zoo_entry(f, zoo=zoo)                                  # raises if any metric differs by > 1e-4
    committed = json.loads(f.read_text())["metrics"]
    assert got["cross"]["mAP"] == pytest.approx(committed["cross"]["mAP"], abs=1e-4)


@pytest.mark.slow
def test_evaluate_notebook_on_zoo_models_gives_the_report_numbers(tmp_path, zoo, emoji_data):
    """A reader who evaluates the zoo's seed-0 L2 pair with the generic `evaluate.ipynb` (protocol `retrieval`) gets the
    numbers of the committed study report: the study and the evaluate notebook measure the same thing the same way."""
    f = next((ROOT / "reports" / "unibct_cpu" / "runs").glob(L2_PAIR))
    r = json.loads(f.read_text())
    out = tmp_path / "eval"
    _papermill("evaluate.ipynb", tmp_path / "evaluate_out.ipynb", old_run=str(zoo / r["old_run"]),
               new_runs=json.dumps([str(zoo / r["new_run"])]), refresh_steps=2, refresh_seeds=[0], out_dir=str(out),
               cache_dir=str(tmp_path / "cache"))
    (ed,) = [p for p in out.iterdir() if p.name.startswith("evaluate-")]
    res = json.loads((ed / "evaluation.json").read_text())
    committed = r["metrics"]
    assert res["n_test"] == committed["n_test"] and res["n_test_classes"] == committed["n_test_classes"]
    got = {"old/old": res["old/old"], "self": res["new"]["l2"]["self"], "cross": res["new"]["l2"]["cross"]}
    for side in ("old/old", "self", "cross"):
        for m in ("mAP", "R@1", "R@5", "R@10"):
            assert got[side][m] == pytest.approx(committed[side][m], abs=1e-4), (side, m)
    # The same pair as stored embeddings (ids + vectors + labels: what a model trained elsewhere gives), exported from
    # the two zoo models and fed through `-p protocol features`: every number is the run-folder evaluation's.
    from bctnb.features import export_features
    from bctnb.protocols import split_images
    from bctnb.runs import Run
    X, y = split_images(Run(zoo / r["old_run"]).config, "test")
    old_f, new_f = (export_features(zoo / r[k], X, tmp_path / f"{k}.npz", labels=y, cache_dir=tmp_path / "cache")
                    for k in ("old_run", "new_run"))
    _papermill("evaluate.ipynb", tmp_path / "evaluate_feats.ipynb", protocol="features", old_features=str(old_f),
               new_features=str(new_f), refresh_steps=2, refresh_seeds=[0], out_dir=str(tmp_path / "feats"))
    (fd,) = (tmp_path / "feats").iterdir()
    feats = json.loads((fd / "evaluation.json").read_text())
    assert feats["protocol"] == "features" and feats["n_test"] == res["n_test"]
    assert feats["old/old"] == res["old/old"]
    assert feats["new"]["new_run"]["self"] == res["new"]["l2"]["self"]
    assert feats["new"]["new_run"]["cross"] == res["new"]["l2"]["cross"]


# ---------------------------------------------------------------- tuning on validation classes (bctnb.tune, tune.ipynb)
_TUNE = dict(scale="smoke", dataset="synthetic", dataset_kw={"num_classes": 40, "per_class": 6}, methods=["l2"])


@pytest.mark.slow
def test_tune_then_fair_notebooks_smoke(tmp_path, runs):
    """tune.ipynb trains the grid without the validation classes and selects on them; reproduce_fair.ipynb then puts
    the reference and the validated L2 side by side on the test classes (the tuning's models reused) with the paired
    difference in the report"""
    from bctnb.study import load_results
    reports = tmp_path / "reports"
    _papermill("tune.ipynb", tmp_path / "t.ipynb", out_dir=str(reports / "tune_s"), run_root=str(runs), **_TUNE)
    # the tuning: the grid (independent + 4 L2 points) trained without the validation classes and scored on them
    tuned = load_results(reports / "tune_s")
    assert sorted(tuned.method) == sorted(["independent", "l2", "l2:lam=1.0", "l2:lam=3.0", "l2:lam=30.0"])
    assert set(tuned.part) == {"val"}
    tres = {json.loads(f.read_text())["method"]: json.loads(f.read_text()) for f in (reports / "tune_s" / "runs").glob("*.json")}
    # 40 classes: 8 test, 4 validation (val_ratio 0.1), and the metrics come from the 4 validation classes
    assert {(r["config"]["val_ratio"], r["metrics"]["n_test_classes"], r["metrics"]["part"]) for r in tres.values()} == {(0.1, 4, "val")}
    tr = (reports / "tune_s" / "README.md").read_text()
    assert "## open-class: every grid point (validation classes)" in tr and "## open-class: selection" in tr
    assert "4 classes / 24 images" in tr and "## Environment and cost" in tr
    import pandas as pd
    chosen = pd.read_csv(reports / "tune_s" / "selection.csv").set_index("method").loc["l2", "chosen"]
    _papermill("reproduce_fair.ipynb", tmp_path / "f.ipynb", scale="smoke", dataset="synthetic",
               dataset_kw=_TUNE["dataset_kw"], tuning="tune_s", reports=str(reports), scenarios=["open-class"],
               seeds=[0], methods=["l2"], out_dir=str(reports / "fair_s"), run_root=str(runs))
    df = load_results(reports / "fair_s")
    from bctnb.tune import BASELINES
    assert set(df.part) == {"test"} and set(df.method) == {*BASELINES, "l2", chosen}
    assert set(df.loc[df.method == "l2", "job"]) != set(tuned.loc[tuned.method == "l2", "job"])   # another result …
    res = {json.loads(f.read_text())["method"]: json.loads(f.read_text()) for f in (reports / "fair_s" / "runs").glob("*.json")}
    assert res["l2"]["new_run"] == tres["l2"]["new_run"]                                          # … of the same model
    readme = (reports / "fair_s" / "README.md").read_text()
    assert "## Validated − reference (test classes, paired by seed)" in readme and "## Verdicts" in readme
    # the README's claims table from the study folder: every claim gets a verdict; what this study did not run is
    # "not tested here", with why
    from bctnb.claims import CLAIMS, claims_table
    ct = claims_table({"synthetic": (reports / "fair_s", {"l2": chosen})}).set_index("claim")
    assert list(ct.index) == list(CLAIMS.values())
    assert ct.loc[CLAIMS["independent"], "synthetic"].startswith(("**holds**", "**does not hold**"))
    assert ct.loc[CLAIMS["mixbct_weak"], "synthetic"].startswith("**not tested here** (no 'weak128' old model")
    # the pipeline notebook writes the table; a dataset without fair-study results is "not tested here" throughout
    _papermill("claims.ipynb", tmp_path / "c.ipynb", studies={"synthetic": ["fair_s"], "none": ["fair_none"]},
               tunings={"synthetic": "tune_s"}, reports=str(reports))
    md = (reports / "claims.md").read_text()
    assert "| synthetic | none |" in md.replace("rule (holds when …) | ", "") and md.count("no fair-study results") == 7


@pytest.mark.slow
def test_selection_never_reads_the_test_split(tmp_path, runs, monkeypatch):
    """Tuning — training the grid, evaluating it, selecting — with the test images made unreadable: it still works, and
    the guard is real (a test evaluation of the same models trips it)."""
    import bctnb.protocols as P
    from bctnb.study import evaluate_pair, load_results, run_study
    from bctnb.train import TrainConfig
    from bctnb.tune import plan_tuning, select_settings
    read, real = [], P.split_images
    def guarded(config, which="test"):
        read.append(which)
        if which == "test": raise AssertionError("the test split was read")
        return real(config, which)
    monkeypatch.setattr(P, "split_images", guarded)
    jobs = plan_tuning(_TUNE["scale"], methods=_TUNE["methods"], dataset=_TUNE["dataset"], dataset_kw=_TUNE["dataset_kw"])
    df = run_study("tune_guard", jobs, tmp_path / "tune", runs, workers=2)
    sel = select_settings(df)
    assert len(sel) == 1 and sel.loc[0, "chosen"].startswith("l2") and "test" not in read and "val" in read
    r = json.loads(sorted((tmp_path / "tune" / "runs").glob("*.json"))[0].read_text())
    with pytest.raises(AssertionError, match="the test split was read"):
        evaluate_pair(Path(runs) / r["old_run"], Path(runs) / r["new_run"], TrainConfig.from_dict(r["config"]),
                      mechanism=False)


@pytest.mark.slow
def test_bridges_notebook_reproduces_the_source_study(tmp_path, runs):
    """reproduce_bridges.ipynb: a study's (old, independent) pair exported to feature files and bridged through
    evaluate.ipynb; the plain new model's cross-test from the files equals the study's own number"""
    from bctnb.study import plan_study, run_study
    jobs = plan_study("smoke", ["open-class"], ["independent", "l2"], dataset="synthetic",
                      dataset_kw={"num_classes": 40, "per_class": 6})
    run_study("src", jobs, tmp_path / "reports" / "src", runs, workers=2)
    out_dir = tmp_path / "reports" / "bridges_src"
    _papermill("reproduce_bridges.ipynb", tmp_path / "out.ipynb", source="src", seeds=[0], bridges=["procrustes"],
               refresh_steps=2, max_calib=100, reports=str(tmp_path / "reports"), out_dir=str(out_dir),
               run_root=str(runs))
    readme = (out_dir / "README.md").read_text()
    assert "| 0 |" in readme and "| True |" in readme and "| False |" not in readme, readme
    assert "new+procrustes (gallery)" in readme and "new+procrustes (query)" in readme and "| l2 |" in readme
    assert "| 100 |" in readme and "a seeded sample of at most 100" in readme          # the calibration cap
    assert (out_dir / "decision_summary.csv").exists() and (out_dir / "s0" / "evaluate.ipynb").exists()


@pytest.mark.slow
def test_bict_notebook_smoke(tmp_path, runs):
    "reproduce_bict.ipynb: BCT at each λ (one backbone per λ, shared by its ψ rows), both ψ objectives, FCT beside"
    from bctnb.study import load_results
    out_dir = tmp_path / "bict"
    _papermill("reproduce_bict.ipynb", tmp_path / "out.ipynb", scale="smoke", dataset="synthetic",
               dataset_kw={"num_classes": 40, "per_class": 6}, lams=[0, 1], chain_methods=["bct", "bict:psi=ce"],
               out_dir=str(out_dir), run_root=str(runs))
    df = load_results(out_dir)
    assert len(df[df.scenario == "open-class"]) == 2 + 2 + 4       # independent, fct, 2 bct, 2 λ × 2 ψ
    assert len(df[df.scenario == "chain"]) == 2 * 2                # 2 chains × (v1, v2)
    res = {json.loads(f.read_text())["method"]: json.loads(f.read_text()) for f in (out_dir / "runs").glob("*.json")}
    assert res["bict:lam=1,psi=ce"]["new_run"] == res["bict:lam=1,psi=regress"]["new_run"] == res["bct:lam=1"]["new_run"]
    assert res["bict:lam=1,psi=ce"]["metrics"]["gallery"] == "h(old)" and res["bct:lam=1"]["metrics"]["gallery"] == "old"
    readme = (out_dir / "README.md").read_text()
    assert "forward, ψ ce (new → ψ(old))" in readme and "| FCT (independent + regression ψ) |" in readme
    assert (out_dir / "bict.png").exists() and "## Sequential upgrades old → v1 → v2" in readme
    assert "## Did the mechanism act" in readme
    import pandas as pd
    chain = pd.read_csv(out_dir / "chain.csv")
    assert sorted(chain.method) == ["bct", "bict:psi=ce"] and chain[["v1 → old", "v2 → v1", "v2 → old"]].notna().all().all()


@pytest.mark.slow
def test_upgrade_chain_study(tmp_path, runs):
    """run_study on an upgrade-chain plan trains level by level (old, then v1, then v2 against v1) and stores a
    result per stage; for FCT the stage-2 ψ maps v1's features to v2's"""
    from bctnb.study import plan_chain, run_study
    jobs = plan_chain("smoke", ["bct", "fct"], dataset="synthetic", dataset_kw={"num_classes": 60, "per_class": 6})
    df = run_study("chain", jobs, tmp_path / "chain", runs, workers=2)
    res = {(json.loads(f.read_text())["method"], json.loads(f.read_text())["stage"]): json.loads(f.read_text())
           for f in (tmp_path / "chain" / "runs").glob("*.json")}
    assert sorted(res) == [("bct", "v1"), ("bct", "v2"), ("fct", "v1"), ("fct", "v2")] and len(df) == 4
    for m in ("bct", "fct"):
        assert res[(m, "v2")]["old_run"] == res[(m, "v1")]["new_run"] != res[(m, "v1")]["old_run"]
        assert res[(m, "v1")]["config"]["new_ratio"] == 0.6 and res[(m, "v2")]["config"]["new_ratio"] == 1.0
    assert res[("fct", "v2")]["metrics"]["gallery"] == "h(old)" and res[("bct", "v2")]["metrics"]["gallery"] == "old"
    # the chain's compatibility matrix: the stage results are its sub-diagonal; the old gallery, upgraded twice
    # (FCT: h2(h1(old)); BCT: as stored), is the corner
    from bctnb.study import chain_matrix
    for m in ("bct", "fct"):
        runs_m = [Path(runs) / res[(m, "v1")]["old_run"], Path(runs) / res[(m, "v1")]["new_run"],
                  Path(runs) / res[(m, "v2")]["new_run"]]
        before = sorted(p.name for r in runs_m for p in r.glob("*.safetensors"))
        cm = chain_matrix(runs_m, method=m, scale="smoke")
        assert sorted(p.name for r in runs_m for p in r.glob("*.safetensors")) == before     # the stages' h, not a refit
        C = np.array(cm["C"])
        assert C[1, 0] == res[(m, "v1")]["metrics"]["cross"]["mAP"] and C[2, 1] == res[(m, "v2")]["metrics"]["cross"]["mAP"]
        assert C[1, 1] == res[(m, "v1")]["metrics"]["self"]["mAP"] and np.isfinite(C[2, 0]) and {"AC", "BC", "FC"} <= set(cm)
