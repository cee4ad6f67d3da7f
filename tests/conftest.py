"""Shared pytest fixtures.

`emoji_data` is the one emoji build of the whole run (an npm download and a ~30 s render): a folder that is new for
this pytest run and shared by its xdist workers, built from nothing by whichever test asks first.

`old_run` is the one smoke-preset old model of the whole session (synthetic data, in-process `train`): every test that
needs a finished train_old run (test_train, test_losses, test_train_new) uses it instead of training its own. Under
pytest-xdist each worker is its own session and trains its own copy into its own tmp folder, so workers never share
a run folder. Tests must treat it as read-only: a new run trained against it goes into the test's own `tmp_path`.

The method lists of the tests come from the registry (`methods()`), so a newly registered method is tested without
editing a test (tests/shared.py)."""
import os

import pytest

os.environ.setdefault("BCTNB_NO_PROGRESS", "1")

from shared import OLD_DATA, OLD_DIM


@pytest.fixture(scope="session")
def old_run(tmp_path_factory):
    "The session's finished smoke old run (a run folder path); read-only for tests"
    from bctnb.runs import Run
    from bctnb.train import TrainConfig, train
    path = train(TrainConfig.make("smoke", "old", dim=OLD_DIM, **OLD_DATA), root=tmp_path_factory.mktemp("old_runs"))
    assert Run(path).done
    return path


def _run_wide(tmp_path_factory, worker_id, name):
    "A folder of this pytest run shared by all its xdist workers (each worker is its own session)"
    base = tmp_path_factory.getbasetemp()
    path = (base if worker_id == "master" else base.parent) / name
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def smoke_runs(tmp_path_factory, worker_id):
    """The run root of the smoke studies (test_reproduce), shared by all xdist workers: a model that two studies plan
    (same run id) is trained once, by whichever worker gets there first; the run lock makes the other wait for it."""
    return _run_wide(tmp_path_factory, worker_id, "smoke_runs")


@pytest.fixture(scope="session")
def emoji_data(tmp_path_factory, worker_id):
    """$BCTNB_DATA for the tests that need the emoji set: a folder created by this pytest run (so the set is built from
    nothing once per run) and shared by all xdist workers (the build lock makes a second worker wait for the first build
    instead of building again). Read-only for tests: one that must damage a file works on a copy."""
    home = _run_wide(tmp_path_factory, worker_id, "bctnb_data")
    old = os.environ.get("BCTNB_DATA")
    os.environ["BCTNB_DATA"] = str(home)
    yield home
    if old is None: os.environ.pop("BCTNB_DATA", None)
    else: os.environ["BCTNB_DATA"] = old
