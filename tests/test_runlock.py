"""core.RunLock and its use by launch.torchrun and train.train: two launches of one run never train it at once."""
import json, os, signal, socket, subprocess, sys, threading, time
from pathlib import Path

import pytest

from bctnb.core import ConfigError, load_json
from bctnb.runs import Run, RunLock, RunLockedError
from bctnb.launch import LaunchError, torchrun
from bctnb.losses import METHODS, Method
from bctnb.train import NonFiniteLossError, train
from test_train import ROOT, smoke

HOST = socket.gethostname()


@METHODS.register("_test_gate")
class _Gate(Method):
    "Independent training that waits at step 1 until `_Gate.go` is set (so a test can act while the run holds its lock)"
    name = "_test_gate"
    go = threading.Event()
    def forward(self, batch):
        if batch.step == 1: assert _Gate.go.wait(120), "the gate was never opened"
        return {"cls": self.cls_loss(batch)}


def cfg_(**kw): return smoke(**{"batch_size": 16, "dim": 16, "max_steps": 6, **kw})


def loss_steps(run_dir) -> list:
    "Steps of the per-step metric rows (a second trainer in the folder would log each step twice)"
    return Run(run_dir).metrics().dropna(subset=["loss"])["step"].tolist()


def run_together(*calls):
    "Start the calls in threads at the same moment; their results (the return value or the exception), in order"
    out, bar = [None] * len(calls), threading.Barrier(len(calls))
    def go(i, f):
        bar.wait()
        try: out[i] = f()
        except BaseException as e: out[i] = e
    ts = [threading.Thread(target=go, args=(i, f)) for i, f in enumerate(calls)]
    for t in ts: t.start()
    for t in ts: t.join(300)
    return out


@pytest.mark.slow
def test_two_concurrent_launches_one_trains_the_other_is_refused(tmp_path):
    cfg = cfg_()
    launch = lambda: torchrun("bctnb.train", cfg, run_root=tmp_path, echo=False)
    res = run_together(launch, launch)
    paths = [r for r in res if isinstance(r, Path)]
    errs = [r for r in res if isinstance(r, BaseException)]
    assert len(paths) == 1 and len(errs) == 1, res
    (path,), (err,) = paths, errs
    assert isinstance(err, RunLockedError), repr(err)
    msg = str(err)
    assert msg.startswith(f"run folder {path} is being trained by")                 # refused at once, not after a wait
    assert f"being trained by pid {os.getpid()} on host {HOST}" in msg and str(path) in msg and "lock_wait" in msg
    assert Run(path).done and load_json(path / "summary.json")["steps"] == 6
    assert loss_steps(path) == [1, 2, 3, 4, 5, 6]                       # one trainer: no duplicate step rows
    assert RunLock(path).owner() is None                                # released, record emptied


@pytest.mark.slow
def test_wait_mode_waits_then_returns_the_finished_run(tmp_path, capsys, monkeypatch):
    "An in-process train() holds the lock; a launch with lock_wait waits, then finds the run done and trains nothing"
    cfg = cfg_(method="_test_gate")
    _Gate.go.clear()
    busy = RunLock._busy_owner
    def busy_and_open(self):                       # the launch found the lock taken: let the in-process run finish
        o = busy(self); _Gate.go.set(); return o
    monkeypatch.setattr(RunLock, "_busy_owner", busy_and_open)
    holder = {}
    t = threading.Thread(target=lambda: holder.update(path=train(cfg, root=tmp_path)))
    t.start()
    run_dir = tmp_path / f"train_old-{cfg.hash()}"
    t0 = time.monotonic()
    while RunLock(run_dir).owner() is None:                            # until the in-process run holds the lock
        assert t.is_alive() and time.monotonic() - t0 < 120, holder
        time.sleep(0.05)
    try:
        path = torchrun("bctnb.train", cfg, run_root=tmp_path, echo=False, lock_wait=120)
    finally:
        _Gate.go.set(); t.join(120)
    out = capsys.readouterr().out
    assert holder["path"] == path == run_dir
    assert f"is being trained by pid {os.getpid()} on host {HOST}" in out and "waiting" in out
    assert "is already done; returning it" in out and "torchrun --standalone" not in out   # no worker was started
    assert loss_steps(path) == [1, 2, 3, 4, 5, 6] and load_json(path / "summary.json")["steps"] == 6


def test_wait_with_a_limit_gives_up_with_the_owner_named(tmp_path):
    cfg = cfg_()
    run = Run.create(cfg.run_name, cfg, tmp_path)
    with RunLock(run.path):
        with pytest.raises(RunLockedError, match=r"still locked after waiting 0\.\d s: run folder .* pid \d+"):
            train(cfg, root=tmp_path, lock_wait=0.5)
    assert run.status["status"] == "created" and not (run.path / "metrics.jsonl").exists()


def test_stale_lock_of_a_killed_process_is_taken_over(tmp_path, capsys):
    cfg = cfg_(max_steps=2)
    run = Run.create(cfg.run_name, cfg, tmp_path)
    code = ("import os, signal, sys; from bctnb.runs import RunLock\n"
            "RunLock(sys.argv[1]).acquire(); os.kill(os.getpid(), signal.SIGKILL)")          # dies holding the lock
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    p = subprocess.Popen([sys.executable, "-c", code, str(run.path)], env=env, stderr=subprocess.PIPE, text=True)
    assert p.wait(120) == -signal.SIGKILL, p.stderr.read()
    left = json.loads((run.path / "run.lock").read_text())
    assert (left["pid"], left["host"]) == (p.pid, HOST)              # the killed owner's record is still in the file
    path = train(cfg, root=tmp_path)                                 # the kernel dropped its flock: the run goes ahead
    out = capsys.readouterr().out
    assert f"taking over the stale run lock of pid {left['pid']} on host {HOST}" in out and "no longer runs" in out
    assert Run(path).done and loss_steps(path) == [1, 2]


def test_lock_released_after_an_in_process_failure(tmp_path):
    cfg = cfg_(lr=1e30, amp=False)
    with pytest.raises(NonFiniteLossError):
        train(cfg, root=tmp_path)
    run_dir = tmp_path / f"train_old-{cfg.hash()}"
    with RunLock(run_dir) as lk:                                       # free again, in this very process
        assert lk.taken_over is None                                   # a clean release, not a stale one


@pytest.mark.slow
def test_lock_released_after_a_failed_launch_so_the_next_launch_resumes(tmp_path):
    cfg = cfg_(ckpt_every=2)
    with pytest.raises(LaunchError, match="torchrun exited with code"):   # the worker SIGKILLs itself after step 3
        torchrun("bctnb.train", cfg, run_root=tmp_path, echo=False, env={"BCTNB_FAULT_AT_STEP": "3"})
    run_dir = tmp_path / f"train_old-{cfg.hash()}"
    assert not Run(run_dir).done and RunLock(run_dir).owner() is None
    assert torchrun("bctnb.train", cfg, run_root=tmp_path, echo=False) == run_dir   # resumes from step 2
    assert Run(run_dir).done and loss_steps(run_dir) == [1, 2, 3, 4, 5, 6]


def test_bad_lock_wait_is_refused_before_anything_is_created(tmp_path):
    for bad in (-1, float("nan"), "yes"):
        with pytest.raises(ConfigError, match="lock_wait=.* is not valid; pass False"):
            torchrun("bctnb.train", cfg_(), run_root=tmp_path, lock_wait=bad)
    assert list(tmp_path.iterdir()) == []
