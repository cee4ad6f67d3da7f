"""bctnb.train / bctnb.launch: the one training loop, its checkpoints and resume, and torchrun from notebooks."""
import json, os, sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bctnb.core import ConfigError, IntegrityError, NotFoundError, available_devices, load_json
from bctnb.runs import Run
from bctnb.losses import METHODS, Method
from bctnb.models import load_model
from bctnb.train import NonFiniteLossError, TrainConfig, lr_at, prepare_data, train
from bctnb.launch import LaunchError, torchrun
from shared import OLD_DATA, OLD_DIM

ROOT = Path(__file__).resolve().parents[1]
SYN = {"num_classes": 60, "per_class": 8}          # synthetic dataset: old split 112 images, new split 272


def smoke(role="old", **kw):
    "The smoke preset on the synthetic dataset; max_steps=None lifts the preset's step cap"
    cap = kw.pop("max_steps", "preset")
    cfg = TrainConfig.make("smoke", role, **{"dataset": "synthetic", "dataset_kw": SYN, **kw})
    return cfg if cap == "preset" else cfg.replace(max_steps=cap)


# ---------------------------------------------------------------- test-only methods (registered in this process)
@METHODS.register("_test_record")
class _Record(Method):
    "Records what the trainer hands a method"
    name = "_test_record"
    seen = []
    def forward(self, batch):
        _Record.seen.append(dict(step=batch.step, epoch=batch.epoch, total=batch.total_steps, spe=batch.steps_per_epoch,
                                 feats_dtype=batch.feats.dtype, grad=batch.feats.requires_grad, images=tuple(batch.images.shape),
                                 flipped=batch.flipped.clone(), index=batch.index.clone(), labels=batch.labels.clone(),
                                 global_labels=batch.global_labels.clone(), head_rows=batch.head.num_classes))
        return {"cls": self.cls_loss(batch)}


@METHODS.register("_test_nan")
class _NaN(Method):
    "Loss becomes NaN from step `at` on"
    name = "_test_nan"
    defaults = {"at": 5}
    def forward(self, batch):
        loss = self.cls_loss(batch)
        return {"cls": loss * float("nan") if batch.step >= self.at else loss}


@METHODS.register("_test_crash")
class _Crash(Method):
    "Raises KeyboardInterrupt once at step `armed` (an interrupted process), else behaves like independent"
    name = "_test_crash"
    armed = None
    def forward(self, batch):
        if _Crash.armed is not None and batch.step == _Crash.armed:
            _Crash.armed = None
            raise KeyboardInterrupt("simulated interruption")
        return {"cls": self.cls_loss(batch)}


@METHODS.register("_test_stateful")
class _Stateful(Method):
    "Training state in a buffer (created in setup) and in get_extra_state; the loss depends on both"
    name = "_test_stateful"
    armed = None
    def setup(self, ctx):
        self.register_buffer("count", torch.zeros(()))
        self.calls = 0
    def get_extra_state(self): return {"calls": self.calls}
    def set_extra_state(self, st): self.calls = st["calls"]
    def forward(self, batch):
        if _Stateful.armed is not None and batch.step == _Stateful.armed:
            _Stateful.armed = None
            raise KeyboardInterrupt("simulated interruption")
        self.count += 1; self.calls += 1
        return {"cls": self.cls_loss(batch) * (1 + 0.01 * self.count + 0.001 * self.calls)}


@METHODS.register("_test_old_online")
class _OldOnline(Method):
    "Uses the frozen old model online (same view), like l2 with online features"
    name = "_test_old_online"
    needs_old, old_features, equal_dims = True, "online", True
    modes = []
    def setup(self, ctx): self._old["bb"] = ctx.old_backbone
    def forward(self, batch):
        old = self._old["bb"]
        _OldOnline.modes.append(old.training)
        with torch.no_grad(): o = old(batch.images).float()
        return {"cls": self.cls_loss(batch), "l2": (F.normalize(batch.feats) - F.normalize(o)).norm(dim=1).mean()}


@METHODS.register("_test_cached")
class _Cached(Method):
    name = "_test_cached"
    needs_old, old_features = False, "cached"
    def forward(self, batch): return {"cls": self.cls_loss(batch)}


# `old_run`: the session-wide smoke old run of tests/conftest.py (synthetic OLD_DATA, dim 16); new runs trained against
# it use its data (on_old_data) and go into the test's own tmp_path.
def on_old_data(**kw):
    "A smoke new-run config on the old run's dataset"
    return smoke("new", **{"dataset_kw": OLD_DATA["dataset_kw"], **kw})


# ---------------------------------------------------------------- config
@pytest.mark.parametrize("key,value,msg", [("backbone", "resnet18", "Valid backbones"), ("head", "sphereface", "Valid heads"),
                                           ("dataset", "imagenet", "Valid datasets"), ("method", "bct2", "Valid methods"),
                                           ("scenario", "open", "scenario='open' is not valid"), ("lr", -1.0, "lr=-1.0")])
def test_bad_config_values_are_named(key, value, msg):
    with pytest.raises(ConfigError, match=msg):
        smoke(**{key: value})


def test_cpu_preset_is_the_trial_recipe():
    old, new = TrainConfig.make("cpu", "old"), TrainConfig.make("cpu", "new")
    assert (old.backbone, old.dim, old.head, old.epochs, old.batch_size, old.lr, old.schedule) == ("cpu_resnet", 128, "softmax", 30, 128, 0.1, "poly")
    assert (new.head, new.s, new.m, new.epochs) == ("arcface", 30.0, 0.3, 25)
    assert old.warmup_epochs == pytest.approx(0.05 * 30) and new.warmup_epochs == pytest.approx(0.05 * 25)


def test_poly_schedule_reaches_zero_and_decreases():
    c = TrainConfig(lr=0.1, schedule="poly", power=2.0)
    lrs = [lr_at(t, 50, 10, c) for t in range(51)]
    assert lrs[0] == 0.1 and lrs[-1] == 0.0 and all(a >= b for a, b in zip(lrs, lrs[1:]))


# ---------------------------------------------------------------- in-process training
def test_batch_handed_to_method(tmp_path):
    _Record.seen.clear()
    cfg = smoke(method="_test_record", epochs=2, max_steps=None, batch_size=16, dim=16, aug_rrc=None, aug_jitter=0.0)
    train(cfg, root=tmp_path)
    data = prepare_data(cfg)
    seen = _Record.seen
    spe = len(data.positions) // 16
    assert [s["step"] for s in seen] == list(range(2 * spe)) and {s["total"] for s in seen} == {2 * spe}
    assert [s["epoch"] for s in seen] == [0] * spe + [1] * spe
    for s in seen:
        assert s["feats_dtype"] == torch.float32 and s["grad"] and s["images"] == (16, 3, 32, 32) and s["flipped"].dtype == torch.bool
        assert torch.equal(s["labels"], data.labels[s["index"]])
        assert torch.equal(s["global_labels"], data.global_labels[s["index"]])
        assert torch.equal(torch.as_tensor(data.label_map)[s["labels"]], s["global_labels"])   # head row -> global class
        assert s["head_rows"] == len(data.label_map)
    ep0 = torch.cat([s["index"] for s in seen[:spe]])
    assert len(set(ep0.tolist())) == len(ep0)                                  # no row twice in one epoch
    flips = torch.cat([s["flipped"] for s in seen]).float().mean()
    assert 0.2 < flips < 0.8                                                    # BatchAugment really flips about half


def test_dataloader_path_equals_in_memory_path(tmp_path):
    """Datasets too big for RAM go through one DataLoader whose worker persists across epochs: same rows, same order,
    same model as the in-memory gather (two epochs, so the second epoch's batches reach the same worker)"""
    kw = dict(max_steps=None, epochs=2, batch_size=16, dim=16)
    a = train(smoke(in_memory=True, **kw), root=tmp_path / "a")
    b = train(smoke(in_memory=False, num_workers=1, **kw), root=tmp_path / "b")
    sa, sb = load_json(a / "summary.json"), load_json(b / "summary.json")
    assert sa["model_sha256"] == sb["model_sha256"] and sa["epoch_losses"] == sb["epoch_losses"]


def test_label_map_saved_with_model(tmp_path, old_run):
    _, head, info = load_model(old_run)
    cfg = TrainConfig.from_dict(Run(old_run).config)
    assert info["label_map"].tolist() == prepare_data(cfg).split.label_map("old").tolist()
    assert head.num_classes == len(info["label_map"]) and info["dim"] == OLD_DIM == 16


def test_nan_stops_names_step_and_keeps_last_good_checkpoint(tmp_path):
    cfg = smoke(method="_test_nan", method_kw={"at": 5}, max_steps=None, epochs=2, batch_size=16, ckpt_every=2, dim=16)
    with pytest.raises(NonFiniteLossError, match="at step 5 .*last good checkpoint \\(step 4"):
        train(cfg, root=tmp_path)
    run = Run(tmp_path / f"train_old-{cfg.hash()}")
    assert load_json(run.path / "ckpt" / "last.json")["step"] == 4
    assert run.status["status"] == "failed" and "at step 5" in run.status["error"]
    assert not (run.path / "model").exists()


def test_deferred_host_sync_trains_the_same_and_still_stops_on_nan(tmp_path):
    """host_sync="log" (what a GPU does by default: loss terms to the host only at logging, epoch-end and checkpoint
    steps) trains bit-identically to a sync per step, logs the same losses, and a NaN between syncs is still caught,
    named by its own step, with the checkpoint before it kept"""
    kw = dict(max_steps=None, epochs=2, batch_size=16, dim=16, log_every=4, ckpt_every=4)     # 7 steps per epoch
    a = train(smoke(host_sync="step", **kw), root=tmp_path / "a")
    b = train(smoke(host_sync="log", **kw), root=tmp_path / "b")
    sa, sb = load_json(a / "summary.json"), load_json(b / "summary.json")
    assert sa["model_sha256"] == sb["model_sha256"] and sa["epoch_losses"] == sb["epoch_losses"]
    ma, mb = Run(a).metrics(), Run(b).metrics()
    assert ma.dropna(subset=["loss"])[["step", "loss"]].equals(mb.dropna(subset=["loss"])[["step", "loss"]])
    cfg = smoke(method="_test_nan", method_kw={"at": 5}, host_sync="log", **kw)     # syncs after steps 3, 6 (epoch end)
    with pytest.raises(NonFiniteLossError, match="at step 5 .*found at step 6.*last good checkpoint \\(step 4"):
        train(cfg, root=tmp_path / "c")
    run = Run(tmp_path / "c" / f"train_old-{cfg.hash()}")
    assert load_json(run.path / "ckpt" / "last.json")["step"] == 4 and not (run.path / "model").exists()


def test_channels_last_option_trains_the_same_model_to_rounding(tmp_path):
    "channels_last (a runtime option: same run id) changes only the memory layout, so the losses agree to rounding"
    kw = dict(max_steps=4, batch_size=16, dim=16)
    a, b = train(smoke(**kw), root=tmp_path / "a"), train(smoke(channels_last=True, **kw), root=tmp_path / "b")
    assert a.name == b.name                                                    # not in the run id
    la, lb = (Run(r).metrics().dropna(subset=["loss"])["loss"].to_numpy() for r in (a, b))
    assert len(la) == len(lb) == 4 and np.allclose(la, lb, rtol=1e-3)


def test_interrupted_in_process_run_resumes_to_identical_model(tmp_path):
    cfg = smoke(method="_test_crash", max_steps=None, epochs=2, batch_size=16, ckpt_every=3, dim=16)   # 7 steps/epoch
    _Crash.armed = None
    ref = train(cfg, root=tmp_path / "a")
    _Crash.armed = 5                                                           # interrupted mid-epoch 0, after checkpoint 3
    with pytest.raises(KeyboardInterrupt):
        train(cfg, root=tmp_path / "b")
    run = tmp_path / "b" / f"train_old-{cfg.hash()}"
    assert load_json(run / "ckpt" / "last.json")["step"] == 3 and not Run(run).done
    train(cfg, root=tmp_path / "b")
    a, b = load_json(ref / "summary.json"), load_json(run / "summary.json")
    assert a == b and a["steps"] == 14                                         # same losses, bit-identical weights
    steps = Run(run).metrics().dropna(subset=["loss"])["step"].tolist()
    assert steps == list(range(1, 15))                                         # no duplicate rows after resume
    # TensorBoard event files beside metrics.jsonl (two writers: the interrupted attempt and the resumed one); the
    # resumed writer purged the first attempt's steps 4-5, so TensorBoard shows each step once, with the reference's loss
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    def tb(r):
        ea = EventAccumulator(str(r / "tensorboard")); ea.Reload()
        return [(e.step, e.value) for e in ea.Scalars("loss")]
    assert len(list((run / "tensorboard").iterdir())) == 2
    assert tb(run) == tb(ref) and [s for s, _ in tb(run)] == list(range(1, 15))
    loss = Run(ref).metrics().dropna(subset=["loss"])["loss"].tolist()
    assert [v for _, v in tb(ref)] == [np.float32(x) for x in loss]           # the logged values (fp32 in TensorBoard)


def test_method_state_survives_resume(tmp_path):
    cfg = smoke(method="_test_stateful", max_steps=None, epochs=2, batch_size=16, ckpt_every=3, dim=16)
    _Stateful.armed = None
    ref = train(cfg, root=tmp_path / "a")
    _Stateful.armed = 8
    with pytest.raises(KeyboardInterrupt):
        train(cfg, root=tmp_path / "b")
    st = load_json(tmp_path / "b" / f"train_old-{cfg.hash()}" / "ckpt" / "step-00000006" / "state.json")
    assert st["modules_extra"] == {"method._extra_state": {"calls": 6}}
    res = train(cfg, root=tmp_path / "b")
    assert load_json(ref / "summary.json") == load_json(res / "summary.json")


def test_old_model_frozen_in_eval_mode_and_unchanged(tmp_path, old_run):
    _OldOnline.modes.clear()
    cfg = on_old_data(method="_test_old_online", old_run=str(old_run), dim=16, max_steps=4)
    new = train(cfg, root=tmp_path)
    assert _OldOnline.modes and not any(_OldOnline.modes)                         # old model always in eval mode
    cols = Run(new).metrics().columns
    assert {"loss_cls", "loss_l2"} <= set(cols)
    # the old model on disk is what a fresh load gives, and training did not write to it
    assert Run(old_run).verify()


def test_dim_mismatch_with_old_model(tmp_path, old_run):
    cfg = on_old_data(method="_test_old_online", old_run=str(old_run), dim=32, max_steps=2)
    with pytest.raises(ConfigError, match=r"dim=16 but this run has dim=32.*allows a projection: bridge_lstsq, bridge_procrustes, bridge_ridge, fct, independent, lce \(use_trans=True\)"):
        train(cfg, root=tmp_path)


def test_method_needing_old_model_without_one(tmp_path):
    with pytest.raises(ConfigError, match="needs the old model, but none was given"):
        train(smoke("new", method="_test_old_online", max_steps=2, dim=16), root=tmp_path)


def test_non_bctnb_old_checkpoint(tmp_path):
    bad = tmp_path / "resnet.pth"; bad.write_bytes(b"PK\x03\x04 pickled torch file")
    cfg = smoke("new", method="_test_old_online", old_run=str(bad), dim=16)
    with pytest.raises(IntegrityError, match="not a bctnb checkpoint"):
        cfg.prepare()
    with pytest.raises(NotFoundError, match="checkpoint not found"):
        cfg.replace(old_run=str(tmp_path / "missing")).prepare()


def test_cached_old_features_need_flip_only_augmentation(tmp_path):
    with pytest.raises(ConfigError, match="flip-only augmentation"):
        train(smoke("new", method="_test_cached", max_steps=2, dim=16), root=tmp_path)


def test_too_few_images_for_one_batch():
    with pytest.raises(ConfigError, match="fewer than one global batch of 512"):
        smoke(batch_size=512).prepare()


def test_launcher_refuses_more_processes_than_devices(tmp_path):
    n = available_devices("cpu")
    with pytest.raises(ConfigError, match=f"nproc={n + 1} exceeds"):
        torchrun("bctnb.train", smoke(), nproc=n + 1, run_root=tmp_path, device="cpu")


# ---------------------------------------------------------------- torchrun (slow)
@pytest.mark.slow
def test_killed_worker_restarts_and_matches_uninterrupted_run(tmp_path):
    """Two gloo ranks through torchrun, uninterrupted (the reference) and with rank 1 killed mid-epoch and restarted:
    the same losses at every step and bit-identical weights; a finished run is not trained again."""
    cfg = smoke(nproc=2, epochs=2, batch_size=16, ckpt_every=4, max_steps=None)   # 7 steps/epoch, 14 in all
    ref = torchrun("bctnb.train", cfg, run_root=tmp_path / "ref", echo=False)
    assert Run(ref).done and Run(ref).status["world_size"] == 2
    s = load_json(ref / "summary.json")
    assert s["steps"] == 2 * (112 // 2 // 8) and len(s["epoch_losses"]) == 2 and all(np.isfinite(s["epoch_losses"]))
    assert torchrun("bctnb.train", cfg, run_root=tmp_path / "ref", echo=False) == ref   # done: not trained again
    # rank 1 SIGKILLs itself after step 6 (mid-epoch 0; last checkpoint: step 4); torchrun restarts both workers
    res = torchrun("bctnb.train", cfg, run_root=tmp_path / "kill", max_restarts=1, echo=False, env={"BCTNB_FAULT_AT_STEP": "6:1"})
    a, b = load_json(ref / "summary.json"), load_json(res / "summary.json")
    assert b["steps"] == 14 and a == b                     # same epoch losses and bit-identical weights (model_sha256)
    rows = Run(res).metrics().dropna(subset=["loss"])
    assert rows["step"].tolist() == list(range(1, 15))
    np.testing.assert_array_equal(rows["loss"].values, Run(ref).metrics().dropna(subset=["loss"])["loss"].values)


def _two_nodes(run_path, logs, env=None, timeout=240):
    """Launch a 2-node × 1-process torchrun job on this machine — two torchrun agents meeting at a c10d rendezvous on
    127.0.0.1, as on two machines sharing the run folder — and return both exit codes"""
    import socket, subprocess
    from bctnb.launch import torchrun_command
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    rdzv = ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=bctnb-{port}"]
    penv = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    procs = []
    for node in range(2):
        with open(logs / f"node{node}-{port}.log", "w") as out:
            procs.append(subprocess.Popen(torchrun_command("bctnb.train", [str(run_path)], nproc=1, nnodes=2,
                                                           extra_args=rdzv), env=penv, stdout=out,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
    try: return [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None: p.kill(); p.wait()


@pytest.mark.slow
def test_two_nodes_train_like_one_and_resume_after_a_node_dies(tmp_path):
    """Multi-node: 2 nodes × 1 process (c10d rendezvous, gloo) train exactly what 2 processes on one node train. When
    the worker of one node is killed mid-run (after the step-4 checkpoint), both nodes stop; relaunching both resumes
    from the checkpoint to the same losses and bit-identical weights as the uninterrupted single-node run."""
    kw = dict(epochs=2, batch_size=16, ckpt_every=4, max_steps=None)
    ref = torchrun("bctnb.train", smoke(nproc=2, **kw), run_root=tmp_path / "ref", echo=False)
    cfg = smoke(nproc=1, nnodes=2, **kw)
    run = Run.create(cfg.run_name, cfg, tmp_path / "nodes")
    codes = _two_nodes(run.path, tmp_path, env={"BCTNB_FAULT_AT_STEP": "6:1"})     # global rank 1 dies after step 6
    assert codes != [0, 0] and not Run(run.path).done and list((run.path / "ckpt").iterdir())
    assert _two_nodes(run.path, tmp_path) == [0, 0] and Run(run.path).done
    assert load_json(run.path / "summary.json") == load_json(ref / "summary.json")
    np.testing.assert_array_equal(Run(run.path).metrics().dropna(subset=["loss"])["loss"].values,
                                  Run(ref).metrics().dropna(subset=["loss"])["loss"].values)


@pytest.mark.slow
def test_killed_worker_without_restarts_fails_clearly(tmp_path):
    cfg = smoke(nproc=2, max_steps=4, batch_size=16, ckpt_every=2)
    with pytest.raises(LaunchError, match="torchrun exited with code"):
        torchrun("bctnb.train", cfg, run_root=tmp_path, echo=False, env={"BCTNB_FAULT_AT_STEP": "3:1"})


@pytest.mark.slow
def test_worker_error_is_reraised_in_the_notebook_process(tmp_path):
    cfg = smoke(nproc=2, epochs=4, max_steps=4, batch_size=16, lr=1e30, amp=False)
    with pytest.raises(NonFiniteLossError, match="at step 1"):
        torchrun("bctnb.train", cfg, run_root=tmp_path, echo=False)


@pytest.mark.slow
def test_train_old_notebook_papermill_smoke(tmp_path):
    import papermill as pm
    nb = pm.execute_notebook(str(ROOT / "nbs" / "train_old.ipynb"), str(tmp_path / "out.ipynb"),
                             parameters=dict(dataset="synthetic", dataset_kw=SYN, head="softmax", dim=128, preset="smoke",
                                             nproc=2, run_root=str(tmp_path / "runs")),
                             kernel_name="python3", cwd=str(ROOT / "nbs"), progress_bar=False, execution_timeout=300)
    (run,) = (tmp_path / "runs").glob("train_old-*")
    assert Run(run).done and (run / "loss.png").exists()
    q = load_json(run / "quick_eval.json")
    assert 0 <= q["old/old"]["mAP"] <= 1 and q["old/old"]["n_queries"] == q["test_images"]
    assert any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert Run(run).config["head"] == "softmax" and Run(run).config["dim"] == 128


@pytest.mark.slow
def test_train_old_notebook_unknown_backbone(tmp_path):
    import papermill as pm
    with pytest.raises(pm.PapermillExecutionError, match="unknown backbone 'resnet18'"):
        pm.execute_notebook(str(ROOT / "nbs" / "train_old.ipynb"), str(tmp_path / "out.ipynb"),
                            parameters=dict(dataset="synthetic", backbone="resnet18", preset="smoke", run_root=str(tmp_path)),
                            kernel_name="python3", cwd=str(ROOT / "nbs"), progress_bar=False, execution_timeout=120)
