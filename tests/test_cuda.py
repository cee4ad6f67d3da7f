"""The CUDA path (issue 17): fp16 autocast + GradScaler, the NCCL backend, kill-and-resume under torchrun, faiss on the
GPU. Skipped without an NVIDIA GPU (CI has none); `benchmarks/gpu_check.sh` runs them on a lent device."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from bctnb.core import load_json
from bctnb.runs import Run
from bctnb.train import TrainConfig, train
from bctnb.launch import torchrun

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (CUDA not available)")]
SYN = {"num_classes": 60, "per_class": 8}


def cfg(**kw):
    cap = kw.pop("max_steps", "preset")
    c = TrainConfig.make("smoke", "old", **{"dataset": "synthetic", "dataset_kw": SYN, "device": "cuda", **kw})
    return c if cap == "preset" else c.replace(max_steps=cap)


def test_fp16_autocast_gradscaler_steps(tmp_path):
    "In process on the GPU: fp16 autocast with a GradScaler, finite losses, a saved model, the run says it used CUDA"
    from bctnb.core import select_precision
    p = select_precision("cuda")
    assert p.device.type == "cuda" and p.dtype == torch.float16 and p.use_scaler and p.backend == "nccl"
    run = train(cfg(max_steps=6), root=tmp_path)
    rows = Run(run).metrics().dropna(subset=["loss"])
    assert Run(run).done and np.isfinite(rows["loss"]).all() and len(rows) >= 3
    env = load_json(run / "env.json")
    assert env.get("cuda") and env.get("gpus"), env


def test_nccl_single_process_under_torchrun(tmp_path):
    run = torchrun("bctnb.train", cfg(max_steps=6, nproc=1), run_root=tmp_path, echo=False)
    assert Run(run).done and Run(run).status["world_size"] == 1


def test_killed_worker_resumes_on_cuda(tmp_path):
    """torchrun on the GPU, the worker killed after step 6 and restarted: it resumes from the step-4 checkpoint and
    finishes with the same losses as an uninterrupted run (deterministic kernels)"""
    kw = dict(epochs=2, batch_size=16, ckpt_every=4, max_steps=None, deterministic=True)
    env = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    ref = torchrun("bctnb.train", cfg(**kw), run_root=tmp_path / "ref", echo=False, env=env)
    res = torchrun("bctnb.train", cfg(**kw), run_root=tmp_path / "kill", max_restarts=1, echo=False,
                   env={**env, "BCTNB_FAULT_AT_STEP": "6"})
    a, b = load_json(ref / "summary.json"), load_json(res / "summary.json")
    assert b["steps"] == a["steps"] and b["epoch_losses"] == a["epoch_losses"] and b == a


def test_two_process_ddp_on_one_gpu(tmp_path):
    "2 DDP ranks on one GPU through torchrun (gloo, which lets ranks share a device): the run finishes, 6 finite losses"
    kw = dict(max_steps=6, batch_size=16, deterministic=True)
    env = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    two = torchrun("bctnb.train", cfg(nproc=2, dist_backend="gloo", **kw), run_root=tmp_path / "two", echo=False, env=env)
    assert Run(two).done and Run(two).status["world_size"] == 2
    rows = Run(two).metrics().dropna(subset=["loss"])
    assert len(rows) == 6 and np.isfinite(rows["loss"]).all()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL refuses two ranks on one GPU: needs 2 GPUs")
def test_two_process_ddp(tmp_path):
    run = torchrun("bctnb.train", cfg(max_steps=6, nproc=2, batch_size=16), run_root=tmp_path, echo=False)
    assert Run(run).done and Run(run).status["world_size"] == 2


def test_faiss_gpu_equals_cpu_on_a_100k_gallery():
    "knn through faiss-gpu (when installed) against faiss-cpu's exact search on 100k × 128: the same neighbours"
    import faiss
    if not hasattr(faiss, "StandardGpuResources"):
        pytest.skip("faiss-cpu is installed; pip install -e '.[gpu]' for faiss-gpu")
    g = np.random.default_rng(0)
    G = g.standard_normal((100_000, 128)).astype(np.float32); Q = g.standard_normal((500, 128)).astype(np.float32)
    G /= np.linalg.norm(G, axis=1, keepdims=True); Q /= np.linalg.norm(Q, axis=1, keepdims=True)
    Dg, Ig = faiss.knn_gpu(faiss.StandardGpuResources(), Q, G, 10, metric=faiss.METRIC_INNER_PRODUCT)
    Dc, Ic = faiss.knn(Q, G, 10, metric=faiss.METRIC_INNER_PRODUCT)
    np.testing.assert_allclose(Dg, Dc, atol=1e-5)
    assert (Ig == Ic).mean() > 0.999                        # ties in the last place may swap neighbours


def test_channels_last_compile_and_deferred_sync_on_gpu(tmp_path):
    """The GPU defaults and options: host syncs only at logging steps (host_sync="auto" on CUDA) train the same model as
    a sync per step; channels_last and torch.compile runs finish with finite losses close to the plain run's"""
    kw = dict(max_steps=8, log_every=4, epochs=2)
    a = train(cfg(host_sync="step", **kw), root=tmp_path / "a")
    b = train(cfg(**kw), root=tmp_path / "b")                                  # auto: deferred on CUDA
    la = Run(a).metrics().dropna(subset=["loss"]).set_index("step")["loss"]
    lb = Run(b).metrics().dropna(subset=["loss"]).set_index("step")["loss"]
    assert la.index.equals(lb.index) and np.allclose(la, lb, rtol=1e-5)         # same steps logged, same losses
    for opt in ({"channels_last": True}, {"compile": True}):
        r = train(cfg(**kw, **opt), root=tmp_path / next(iter(opt)))
        lr = Run(r).metrics().dropna(subset=["loss"]).set_index("step")["loss"]
        assert Run(r).done and np.isfinite(lr).all() and np.allclose(lr, la, rtol=0.05), (opt, lr.tolist(), la.tolist())
