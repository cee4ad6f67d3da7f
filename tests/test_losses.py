"""Compatible-training methods (bctnb.losses, bctnb.prototypes): the method interface, the frozen old model, the
old-artefact cache, the cross-method obligations of methods.md §3, and every method training through the one trainer."""
import json, math, os, socket, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("BCTNB_NO_PROGRESS", "1")
from bctnb.core import ConfigError, IntegrityError, NotFoundError
from bctnb.data import ArrayDataset, BatchAugment, normalize
from bctnb.losses import (Batch, MethodContext, Method, METHODS, available_methods, get_method, weakened_l2_loss)
from bctnb.methods import ract_loss, floor_frac
from bctnb.new_run import new_run_config
from bctnb.models import Head, create_backbone
from bctnb.prototypes import (artefact, load_artefact, refine_prototypes, class_means, credible_mask, keep_count)

from shared import methods

ALL = methods()                           # every registered method: a new one is tested without editing this file
# The one place that pins the registry's contents: a method dropping out of the registry would otherwise silently drop
# out of every registry-driven parametrisation. Registering a new method means adding it here.
REGISTERED = ["advbct", "bct", "bct_norm", "bct_ract", "bict", "bridge_lstsq", "bridge_procrustes", "bridge_ridge",
              "contra", "fct", "independent", "l2", "lce", "mixbct", "nccl", "ract", "unibct", "weakened_l2"]


# ----------------------------------------------------------------------------------------------------------- fixtures
def make_ctx(tmp_path, n=48, c=6, dim=16, old_classes=None, aug=None, new_kind="arcface", old_kind="softmax", seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = np.arange(n) % c + 10
    ds = ArrayDataset(torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8), labels)
    oc = np.unique(labels) if old_classes is None else np.asarray(old_classes)
    torch.manual_seed(seed)
    old = create_backbone("cpu_resnet", dim=dim)
    new = create_backbone("cpu_resnet", dim=dim)
    return MethodContext(old_backbone=old, old_head=Head(old_kind, dim, len(oc)), old_info={"label_map": oc, "dim": dim},
                         new_backbone=new, new_head=Head(new_kind, dim, c, s=30.0, m=0.3), train_set=ds,
                         train_global_labels=labels, seed=seed, augment=aug, epochs=2, steps_per_epoch=4, batch_size=n,
                         cache_dir=tmp_path / "cache")


def make_batch(ctx, idx=None, step=0, epoch=0, flipped=None):
    ds = ctx.train_set
    idx = torch.arange(len(ds)) if idx is None else torch.as_tensor(idx)
    fl = torch.zeros(len(idx), dtype=torch.bool) if flipped is None else flipped
    x = normalize(ds.images[idx]); x = torch.where(fl[:, None, None, None], x.flip(-1), x)
    g = torch.as_tensor(ds.labels[idx.numpy()])
    return Batch(images=x, feats=ctx.new_backbone(x).float(), labels=torch.searchsorted(torch.unique(torch.as_tensor(ds.labels)), g),
                 global_labels=g, index=idx, flipped=fl, head=ctx.new_head, epoch=epoch, step=step,
                 total_steps=ctx.epochs * ctx.steps_per_epoch, steps_per_epoch=ctx.steps_per_epoch, epochs=ctx.epochs)


def old_state(ctx):
    sd = {f"bb.{k}": v.clone() for k, v in ctx.old_backbone.state_dict().items()}
    sd.update({f"head.{k}": v.clone() for k, v in ctx.old_head.state_dict().items()})
    return sd


# ------------------------------------------------------------------------------------------------------ the interface
def test_registry_has_every_method():
    assert available_methods() == ALL == REGISTERED
    for name in ALL:
        m = get_method(name)
        assert isinstance(m, Method) and m.name == name and m.__doc__ and "L" in m.__doc__   # formula in the docstring


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ConfigError, match="Valid methods: advbct, bct"):
        get_method("mixbtc")
    with pytest.raises(ConfigError, match=r"no hyper-parameter\(s\) 'lambda'.*alpha=0.3"):
        get_method("mixbct", **{"lambda": 1})


def test_dim_mismatch_names_projection_methods(tmp_path):
    ctx = make_ctx(tmp_path)
    ctx.new_backbone = create_backbone("cpu_resnet", dim=32)
    for name in ("l2", "bct", "unibct", "nccl", "advbct", "mixbct", "ract", "lce"):
        with pytest.raises(ConfigError, match=r"allows a projection: bridge_lstsq, bridge_procrustes, bridge_ridge, fct, independent, lce \(use_trans=True\)"):
            get_method(name).setup(ctx)
    ctx.new_head = Head("arcface", 32, 6)
    get_method("lce", use_trans=True).setup(ctx)          # the projection variant accepts it
    get_method("fct").setup(ctx)


def test_needs_old_model(tmp_path):
    ctx = make_ctx(tmp_path); ctx.old_backbone = None
    with pytest.raises(ConfigError, match="needs the old model"):
        get_method("l2").setup(ctx)


# ------------------------------------------------------------------------------------------------- the frozen old model
@pytest.mark.parametrize("name", methods(needs_old=True))
def test_old_model_unchanged_after_steps(tmp_path, name):
    ctx = make_ctx(tmp_path)
    ctx.old_backbone.train()                                # even if handed over in train mode
    before = old_state(ctx)
    m = get_method(name); m.setup(ctx); m.train(); m.on_epoch_start(1, ctx)
    old_ids = {id(p) for p in list(ctx.old_backbone.parameters()) + list(ctx.old_head.parameters())}
    assert not old_ids & {id(p) for p in m.parameters()}  # never in the optimiser / DDP
    params = list(ctx.new_backbone.parameters()) + list(ctx.new_head.parameters()) + list(m.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    for s in range(3):
        m.train()
        out = m(make_batch(ctx, step=s, epoch=1)); loss = sum(out.values())
        opt.zero_grad(); loss.backward(); opt.step()
    after = old_state(ctx)
    assert all(torch.equal(before[k], after[k]) for k in before), "old parameters or BN running statistics changed"
    assert not ctx.old_backbone.training and not any(p.requires_grad for p in ctx.old_backbone.parameters())


# ------------------------------------------------------------------------------------------------------ the artefacts
def test_cache_reused_and_old_model_mismatch_is_an_error(tmp_path):
    ctx = make_ctx(tmp_path, aug=BatchAugment(flip=True, rrc_scale=None, jitter=0.0))
    m = get_method("mixbct"); m.setup(ctx)
    assert m.source == "cached"
    files = sorted((tmp_path / "cache").rglob("*.safetensors"))
    assert [f.name.split("-split-")[0] for f in files] == ["credible", "old_features"]
    feat_file = [f for f in files if f.name.startswith("old_features")][0]
    side = json.loads(Path(str(feat_file) + ".json").read_text())
    assert side["shapes"]["feat"] == [48, 2, 16] and side["old_model_sha256"] and side["split_sha256"]
    mtime = feat_file.stat().st_mtime_ns
    get_method("mixbct").setup(ctx)                        # second setup: loaded, not recomputed
    assert feat_file.stat().st_mtime_ns == mtime
    # the cache records another old model → IntegrityError naming the file and the fix
    side["old_model_sha256"] = "0" * 64
    Path(str(feat_file) + ".json").write_text(json.dumps(side))
    with pytest.raises(IntegrityError, match=rf"{feat_file.name}.*different old model.*Delete"):
        get_method("mixbct").setup(ctx)
    # a truncated file → IntegrityError
    side["old_model_sha256"] = m.old_hash(ctx); Path(str(feat_file) + ".json").write_text(json.dumps(side))
    feat_file.write_bytes(feat_file.read_bytes()[:-8])
    with pytest.raises(IntegrityError, match="does not match the sha256"):
        get_method("mixbct").setup(ctx)


def test_cached_flip_pair_matches_online_view(tmp_path):
    ctx = make_ctx(tmp_path, aug=BatchAugment(flip=True, rrc_scale=None, jitter=0.0))
    a, b = get_method("l2"), get_method("l2", old_source="online")
    a.setup(ctx); b.setup(ctx)
    batch = make_batch(ctx, flipped=torch.arange(48) % 2 == 0)
    torch.testing.assert_close(a.old_feats(batch), b.old_feats(batch), atol=1e-4, rtol=1e-4)
    with pytest.raises(ConfigError, match="old_source='cached' needs flip-only"):
        get_method("l2", old_source="cached").setup(make_ctx(tmp_path, aug=BatchAugment()))


def test_credible_mask_exact_ceiling():
    assert [keep_count(n, 0.9) for n in (9, 10, 11, 19, 20, 21, 99, 100)] == [9, 9, 10, 18, 18, 19, 90, 90]
    y = torch.repeat_interleave(torch.arange(3), torch.tensor([10, 20, 7]))
    mask = credible_mask(torch.randn(37, 4), y)
    assert [int(mask[y == c].sum()) for c in range(3)] == [9, 18, 7]


# --------------------------------------------------------------------------------------------- methods.md §3 obligations
def test_l2_is_weakened_l2_at_zero_and_free_ball():
    o = torch.randn(16, 8); f = torch.randn(16, 8)
    assert get_method("l2").tau == 0.0
    torch.testing.assert_close(weakened_l2_loss(f, o, 0.0), (F.normalize(f, dim=1) - F.normalize(o, dim=1)).norm(dim=1).mean())
    assert weakened_l2_loss(2 * o, o, 0.2) == 0
    # cos(f̂, ô) ≥ 1 − τ²/2 ⇒ zero
    u = F.normalize(o, dim=1); v = F.normalize(torch.randn(16, 8) - 0, dim=1)
    v = F.normalize(v - (v * u).sum(1, keepdim=True) * u, dim=1)
    c = 1 - 0.2 ** 2 / 2 + 1e-4
    assert weakened_l2_loss(c * u + math.sqrt(1 - c * c) * v, o, 0.2) == 0


def test_bct_new_classes_and_bit_identical_rows(tmp_path):
    ctx = make_ctx(tmp_path, old_classes=[10, 11, 12], old_kind="arcface")    # extended-class: 3 of 6 seen
    m = get_method("bct"); m.setup(ctx)
    assert torch.equal(m.W_infl[:3], ctx.old_head.weight) and m.n_synth == 3
    pair = m.old_pair(ctx)
    mean, _ = class_means(pair[:, 0], ctx.train_set.labels, classes=[13, 14, 15])
    torch.testing.assert_close(m.W_infl[3:], mean)
    batch = make_batch(ctx)
    out = m(batch)
    g = torch.autograd.grad(out["bct"], next(ctx.new_backbone.parameters()))[0]
    assert g.abs().sum() > 0
    # targets: seen classes → their old row, unseen → their synthesized row
    y = m.lookup[batch.global_labels]
    assert torch.equal(y, batch.global_labels - 10)


def test_unibct_invariants():
    g = torch.Generator().manual_seed(0)
    O = torch.randn(20, 6, generator=g); y = torch.arange(20) % 4
    same = torch.randn(1, 6, generator=g).repeat(20, 1)
    torch.testing.assert_close(refine_prototypes(O, same, y)[0], class_means(O, y, spherical=True)[0], atol=1e-5, rtol=0)
    N = torch.randn(20, 6, generator=g)
    assert (refine_prototypes(O, N, y)[0] - class_means(O, y, spherical=True)[0]).abs().max() > 1e-2
    torch.testing.assert_close(refine_prototypes(O, N, y, transition="column")[0], class_means(O, y, spherical=True)[0], atol=1e-5, rtol=0)
    closed = refine_prototypes(O, N, y, normalize=False)[0]
    assert (refine_prototypes(O, N, y, steps=200, normalize=False)[0] - closed).abs().max() < 1e-6


def test_unibct_term_off_before_first_refresh(tmp_path):
    ctx = make_ctx(tmp_path); ctx.epochs = 6
    m = get_method("unibct"); m.setup(ctx)
    assert m.refresh == [2, 3] and m.start == 2
    m.on_epoch_start(0, ctx)
    assert m(make_batch(ctx, epoch=0))["unibct"] == 0
    m.on_epoch_start(2, ctx)
    assert m(make_batch(ctx, epoch=2))["unibct"] > 0 and m.refreshed == 2


def test_nccl_every_term_has_gradient_and_queue_mask(tmp_path):
    ctx = make_ctx(tmp_path)
    m = get_method("nccl", K=100, cap_K=False); m.setup(ctx)
    b = make_batch(ctx); out = m(b)
    p = next(ctx.new_backbone.parameters())
    for k in ("cls", "emb", "disc"):
        assert torch.autograd.grad(out[k], p, retain_graph=True)[0].abs().sum() > 0, k
    assert int(m.valid.sum()) == 48
    # garbage in the 52 unwritten slots changes nothing
    oh = F.normalize(m.old_feats(b), dim=1); zn = m._logits(b.head, b.feats, b.labels)
    ref = m.terms(b.feats, oh, zn, b.labels)
    m.q[~m.valid] = 3.0; m.z[~m.valid] = 1.0; m.ql[~m.valid] = b.labels[0]
    for x, y in zip(ref, m.terms(b.feats, oh, zn, b.labels)): torch.testing.assert_close(x, y)


def test_mixbct_replaces_exactly_and_reproducibly(tmp_path):
    ctx = make_ctx(tmp_path, n=160, c=4)                   # 40 per class → 36 credible per class
    m = get_method("mixbct"); m.setup(ctx)
    idx = torch.arange(128)
    b = make_batch(ctx, idx=idx, step=7)
    out = m(b); rows = m.last_rows
    S = int(m.credible[idx].sum())
    assert len(rows) == min(floor_frac(0.3, 128), S) == 38 and bool(m.credible[idx[rows]].all())
    assert torch.equal(m.choose(b), rows)
    g = torch.autograd.grad(out["cls"], b.feats)[0]
    assert g[rows].abs().sum() == 0 and g.abs().sum() > 0
    # rows really are the (normalised) old features
    assert list(out) == ["cls"]


def test_ract_without_n2n_is_contra_and_same_class_never_negative():
    g = torch.Generator().manual_seed(1)
    f = F.normalize(torch.randn(12, 8, generator=g), dim=1); o = F.normalize(torch.randn(12, 8, generator=g), dim=1)
    y = torch.arange(12) % 3
    contra = ract_loss(f, o, None, y, y, 0, 0.05, 0)
    full = ract_loss(f, o, f, y, y, 0, 0.05, 0)
    assert full > contra
    f2, o2 = f.clone(), o.clone(); f2[3], o2[3] = -f2[3], -o2[3]     # 3 has anchor 0's class
    torch.testing.assert_close(ract_loss(f[:1], o2, f2, y[:1], y, 0, 0.05, 0), ract_loss(f[:1], o, f, y[:1], y, 0, 0.05, 0))


# ----------------------------------------------------------- with the trainer (smoke preset, the session's old run)
# `old_run` is the session-wide smoke old run of tests/conftest.py; new runs go into each test's own tmp_path.
METHOD_KW = {"l2": {"lam": 5.0}}          # a non-default hyper-parameter must reach the run's config


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_every_method_trains_a_few_steps(old_run, name, tmp_path):
    """Every registered method, in process, 2 smoke steps on the shared old run: what train_new.ipynb launches for it
    (tests/test_train_new.py runs the notebook itself once)."""
    from bctnb.runs import Run
    from bctnb.train import train
    kw = METHOD_KW.get(name, {})
    cfg = new_run_config(old_run, name, preset="smoke", max_steps=2, method_kw=kw)
    run = Run(train(cfg, root=tmp_path))
    assert run.done and run.path.parent == tmp_path
    # the run's config says which value a changed default took (NCCL's queue cap) beside the hyper-parameters given
    cls = METHODS.get(name)
    assert run.config["method"] == name
    assert run.config["method_kw"] == {**{k: cls.defaults[k] for k in cls.changed_defaults}, **kw}
    assert run.config["old_run"] == str(Path(old_run).resolve()) and run.config["role"] == "new"
    assert run.verify()                   # every recorded artefact is there with its sha256
    m = run.metrics()
    terms = [c for c in m.columns if c.startswith("loss_")]
    assert "loss_cls" in terms and m[terms].dropna().map(math.isfinite).all().all()
    assert m["loss"].dropna().map(math.isfinite).all()
    assert int(m["step"].max()) == 2
    # mechanism diagnostics (Method.stats) reach the training log next to the loss terms; shares lie in [0, 1]
    stats = ["stat_feat_norm"] + [f"stat_{k}" for k in MECHANISM_STATS.get(name, ())]
    st = m[stats].dropna()
    assert len(st) and (st["stat_feat_norm"] > 0).all(), stats
    shares = [c for c in stats if any(w in c for w in ("share", "outside", "inside", "below", "acc"))]
    assert st[shares].map(lambda v: 0 <= v <= 1).all().all()


MECHANISM_STATS = {   # what each method logs to show its mechanism acting (issue 15's diagnostics)
    "advbct": ("outside_ball", "radius_over_rmax", "disc_acc"), "mixbct": ("denoised_share",),
    "nccl": ("positives_per_anchor", "queue_over_train"), "lce": ("inside_boundary",),
    "weakened_l2": ("below_tau", "cos_new_old"), "l2": ("below_tau", "cos_new_old"),
    "unibct": ("proto_cos_mean",)}


# Methods with training state of their own (`Method.state_dict()` after setup, saved in the trainer's checkpoint):
# AdvBCT's discriminator and radii, NCCL's queue, UniBCT's refreshed prototypes. Pinned here and checked against the
# registry by test_methods_with_checkpoint_state_are_the_pinned_ones: a new stateful method cannot skip the resume test.
STATEFUL = ("advbct", "nccl", "unibct")
# Resume is tested on those, on MixBCT (random rows per step, seeded by (seed, rank, step)) and on BCT, the path every
# other method takes: no state of its own and no randomness, so a resumed run rebuilds it from setup() alone.
RESUMED = STATEFUL + ("mixbct", "bct")


def test_methods_with_checkpoint_state_are_the_pinned_ones(tmp_path):
    has_state = []
    for name in ALL:
        m = get_method(name)
        m.setup(make_ctx(tmp_path / name))
        if m.state_dict(): has_state.append(name)
    assert tuple(has_state) == STATEFUL, "a method with checkpoint state must be in STATEFUL (resume-tested)"


@pytest.mark.parametrize("name", [n if n in STATEFUL else pytest.param(n, marks=pytest.mark.slow) for n in RESUMED])
def test_interrupted_method_run_resumes_bit_identically(old_run, name, tmp_path, monkeypatch):
    """Interrupted in epoch 1 (after UniBCT's refresh, with NCCL's queue filled) and resumed from the checkpoint of
    step 6: the same losses at every step and the same final model as the uninterrupted run."""
    from bctnb.core import load_json
    from bctnb.runs import Run
    from bctnb.train import train
    from safetensors.torch import load_file
    cfg = new_run_config(old_run, name, preset="smoke", epochs=2, ckpt_every=3).replace(max_steps=None)  # 4 steps/epoch, 8 in all
    ref = train(cfg, root=tmp_path / "a")
    cls, crash = METHODS.get(name), {"at": 7}
    fwd = cls.forward
    def interrupted(self, batch):
        if batch.step == crash["at"]:
            crash["at"] = None
            raise KeyboardInterrupt("simulated interruption")
        return fwd(self, batch)
    monkeypatch.setattr(cls, "forward", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, root=tmp_path / "b")
    run = tmp_path / "b" / ref.name
    assert load_json(run / "ckpt" / "last.json")["step"] == 6 and not Run(run).done
    if name in STATEFUL:
        st = load_file(str(run / "ckpt" / "step-00000006" / "state.safetensors"))
        assert any(k.startswith("method.") for k in st), "the method's training state is not in the checkpoint"
    res = train(cfg, root=tmp_path / "b")
    assert load_json(ref / "summary.json") == load_json(res / "summary.json")          # same epoch losses, same weights
    cols = [c for c in Run(ref).metrics().columns if c.startswith("loss")]
    a, b = Run(ref).metrics().dropna(subset=["loss"]), Run(res).metrics().dropna(subset=["loss"])
    assert a["step"].tolist() == b["step"].tolist() == list(range(1, 9))
    assert a[cols].equals(b[cols]), "per-step losses differ after resume"
    for f in ("backbone.safetensors", "head.safetensors"):                             # the saved model carries no method state
        assert not any(k.startswith("method") for k in load_file(str(res / "model" / f)))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


_TWO_RANKS = r'''
import os, sys, torch, torch.nn.functional as F, torch.distributed as dist
dist.init_process_group("gloo")
rank = dist.get_rank()
from bctnb.losses import get_method, gather
from bctnb.methods import ract_loss
g = torch.Generator().manual_seed(0)
o = F.normalize(torch.randn(16, 8, generator=g), dim=1); f = torch.randn(16, 8, generator=g); y = torch.arange(16) % 4
W = F.normalize(torch.randn(4, 8, generator=g), dim=1)
class H(torch.nn.Module):
    weight = W
m = get_method("nccl", K=64); m.q = torch.zeros(64, 8); m.z = torch.zeros(64, 4); m.ql = torch.full((64,), -1)
m.valid = torch.zeros(64, dtype=torch.bool); m.ptr = 0
s = slice(8 * rank, 8 * rank + 8)
zo = m._logits(H(), o[s], y[s])
m.push(gather(o[s]), gather(zo), gather(y[s]))
emb, disc = m.terms(f[s], o[s], m._logits(H(), f[s], y[s]), y[s])
r = ract_loss(F.normalize(f[s], dim=1), gather(o[s]), gather(F.normalize(f[s], dim=1)), y[s], gather(y[s]), 8 * rank, 0.05, 3)
v = torch.stack([emb, disc, r]); dist.all_reduce(v); v /= 2
if rank == 0: print("RESULT", v.tolist(), flush=True)
dist.destroy_process_group(); os._exit(0)
'''


@pytest.mark.slow
def test_nccl_and_ract_same_value_on_two_ranks(tmp_path):
    """Same global batch: one process vs two gloo ranks (global queue, per-rank means averaged as DDP does)."""
    from bctnb.methods import NCCL
    script = tmp_path / "two.py"; script.write_text(_TWO_RANKS)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node=2", str(script)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    two = json.loads(p.stdout.split("RESULT", 1)[1].strip().splitlines()[0])
    # one process
    g = torch.Generator().manual_seed(0)
    o = F.normalize(torch.randn(16, 8, generator=g), dim=1); f = torch.randn(16, 8, generator=g); y = torch.arange(16) % 4
    W = F.normalize(torch.randn(4, 8, generator=g), dim=1)
    H = type("H", (torch.nn.Module,), {"weight": W})
    m = get_method("nccl", K=64); m.q = torch.zeros(64, 8); m.z = torch.zeros(64, 4); m.ql = torch.full((64,), -1)
    m.valid = torch.zeros(64, dtype=torch.bool); m.ptr = 0
    m.push(o, m._logits(H(), o, y), y)
    emb, disc = m.terms(f, o, m._logits(H(), f, y), y)
    r = ract_loss(F.normalize(f, dim=1), o, F.normalize(f, dim=1), y, y, 0, 0.05, 3)
    np.testing.assert_allclose(two, [emb.item(), disc.item(), r.item()], rtol=1e-5)


@pytest.mark.slow
def test_two_process_training_with_method_state(old_run, tmp_path):
    """2 gloo ranks through the launcher: UniBCT's broadcast refresh, AdvBCT's DDP-trained modules, NCCL's gathers."""
    from bctnb.launch import torchrun
    for name in ("unibct", "advbct", "nccl"):
        cfg = new_run_config(old_run, name, preset="smoke", nproc=2, max_steps=2)
        run_dir = torchrun("bctnb.train", cfg, run_root=tmp_path, echo=False, timeout=600)
        assert (run_dir / "model" / "model.json").exists(), name
