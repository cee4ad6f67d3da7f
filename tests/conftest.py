"""Shared pytest fixtures.

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
