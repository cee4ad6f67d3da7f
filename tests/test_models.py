"""bctnb.models: backbones, heads, checkpoints and feature extraction — the behaviour methods and evaluation rely on."""
import json, math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from bctnb.core import ConfigError, IntegrityError, NotFoundError, select_precision
from bctnb.runs import Run
from bctnb.data import ArrayDataset
from bctnb.models import (BACKBONES, HEADS, EmbeddingModel, Head, arcface_psi, create_backbone, create_head,
                          extract_features, head_logits, load_model, save_model)


@pytest.mark.parametrize("name,size,dim", [("cpu_resnet", 32, 128), ("iresnet18", 112, 256), ("resnet50_gem", 64, 512)])
def test_backbone_forward_backward(name, size, dim):
    torch.manual_seed(0)
    m = create_backbone(name, dim=dim)
    f = m(torch.randn(2, 3, size, size))
    assert f.shape == (2, dim) and m.dim == dim
    f.pow(2).sum().backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_registries_list_everything():
    assert BACKBONES.names() == ["cpu_resnet", "iresnet100", "iresnet18", "iresnet50", "resnet101_gem", "resnet50_gem"]
    assert HEADS.names() == ["arcface", "cosface", "normface", "softmax"]


def test_backbone_under_bf16_autocast_gives_finite_features():
    m = create_backbone("cpu_resnet", dim=64)
    with select_precision("cpu").autocast():
        f = m(torch.randn(4, 3, 32, 32))
    assert torch.isfinite(f.float()).all()


def test_arcface_monotone_at_threshold_and_cos_theta_plus_m_below():
    m = 0.5
    thr = math.cos(math.pi - m)
    t = torch.tensor([thr - 1e-6, thr + 1e-6], dtype=torch.float64)
    psi = arcface_psi(t, m)
    # at the threshold the cos branch gives cos(pi) = -1 and the fallback thr - m*sin(m) < -1: the definition has a
    # step there, downwards in t, so the logit stays monotone in t
    assert psi[0] <= psi[1] + 1e-9
    # random angles: the target logit matches s*cos(theta + m) whenever theta + m < pi
    theta = torch.rand(100, dtype=torch.float64) * (math.pi - m - 1e-3)
    f = torch.stack([torch.cos(theta), torch.sin(theta)], 1)
    z = head_logits("arcface", f, torch.eye(2, dtype=torch.float64), torch.zeros(100, dtype=torch.long), s=64.0, m=m)
    torch.testing.assert_close(z[:, 0].double(), 64.0 * torch.cos(theta + m), atol=1e-3, rtol=0)


@pytest.mark.parametrize("kind", ["normface", "cosface", "arcface", "softmax"])
def test_heads_fp32_and_finite_gradients_at_extremes(kind):
    feats = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], dtype=torch.float16, requires_grad=True)
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = head_logits(kind, feats, w, torch.tensor([0, 0, 2]), s=30.0, m=0.3)
    assert z.dtype == torch.float32
    torch.nn.functional.cross_entropy(z, torch.tensor([0, 0, 2])).backward()
    assert torch.isfinite(feats.grad).all() and torch.isfinite(w.grad).all()


def test_margin_only_on_target_column_and_only_with_labels():
    torch.manual_seed(0)
    f, w, y = torch.randn(5, 8), torch.randn(7, 8), torch.tensor([0, 3, 6, 2, 2])
    for kind in ("cosface", "arcface"):
        plain, marg = head_logits(kind, f, w, s=10.0, m=0.3), head_logits(kind, f, w, y, s=10.0, m=0.3)
        diff = (plain != marg)
        assert diff.sum() == 5 and diff[torch.arange(5), y].all()
        assert (marg[torch.arange(5), y] < plain[torch.arange(5), y]).all()   # the margin lowers the target logit


def test_head_validation():
    with pytest.raises(ConfigError, match="num_classes"):
        Head("arcface", 8, 0)
    with pytest.raises(ConfigError, match="out of range"):
        Head("arcface", 8, 3, m=2.0)


def _saved(tmp_path, dim=16, classes=4):
    bb, hd = create_backbone("cpu_resnet", dim=dim), create_head("softmax", dim, classes)
    save_model(tmp_path / "m", EmbeddingModel(bb, hd), label_map=[10, 11, 12, 13])
    return bb, hd


def test_checkpoint_has_no_pickle_and_roundtrips_softmax_bias(tmp_path):
    bb, hd = _saved(tmp_path)
    with torch.no_grad(): hd.bias.add_(1.5)
    save_model(tmp_path / "m", bb, hd, label_map=[10, 11, 12, 13])
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert files == ["backbone.safetensors", "head.safetensors", "model.json"]
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["format"] == "bctnb-model" and meta["label_map"] == [10, 11, 12, 13]
    _, hd2, info = load_model(tmp_path / "m")
    assert torch.equal(hd2.bias, hd.bias) and info["label_map"].dtype == np.int64


def test_load_model_from_run_folder(tmp_path):
    run = Run.create("train_old", {"x": 1}, root=tmp_path)
    bb, _ = _saved(run.path)
    (run.path / "m").rename(run.path / "model")
    bb2, _, info = load_model(run.path)
    assert info["dim"] == 16 and Path(info["path"]) == run.path / "model"


def test_unfinished_run_is_a_clear_error(tmp_path):
    run = Run.create("train_old", {"x": 2}, root=tmp_path)
    with pytest.raises(NotFoundError, match="did not finish"):
        load_model(run.path)


def test_strict_loading_rejects_other_architecture(tmp_path):
    _saved(tmp_path)
    f = tmp_path / "m" / "backbone.safetensors"
    sd = load_file(str(f)); sd["extra.weight"] = torch.zeros(1)
    save_file(sd, str(f))
    with pytest.raises(IntegrityError, match="sha256"):
        load_model(tmp_path / "m")
    with pytest.raises(IntegrityError, match="unexpected keys"):
        load_model(tmp_path / "m", verify=False)


def test_label_map_must_match_head_rows(tmp_path):
    with pytest.raises(ConfigError, match="label_map has 2 entries"):
        save_model(tmp_path / "m", create_backbone("cpu_resnet", dim=8), create_head("arcface", 8, 3), label_map=[1, 2])


def test_dim_mismatch_names_both_dims(tmp_path):
    _saved(tmp_path)
    with pytest.raises(ConfigError, match="dim=16 but dim=128"):
        load_model(tmp_path / "m", dim=128)


def test_extract_features_eval_mode_no_bn_update_and_dataset_equals_tensor():
    torch.manual_seed(0)
    bb = create_backbone("cpu_resnet", dim=16).train()
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    imgs = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8)
    ds = ArrayDataset(imgs, np.arange(12) % 4)
    a = extract_features(bb, ds, batch_size=5)
    b = extract_features(bb, ds.subset(np.arange(12)), batch_size=7, flip="pair")
    assert bb.training
    for k, v in bb.state_dict().items(): assert torch.equal(v, before[k]), k
    torch.testing.assert_close(a, b[:, 0], atol=1e-4, rtol=1e-4)
    # flip-pair rows really are the flipped image's features
    torch.testing.assert_close(b[:, 1], extract_features(bb, torch.flip(imgs, dims=[3]), batch_size=12), atol=1e-4, rtol=1e-4)


def test_extract_features_bad_flip():
    with pytest.raises(ConfigError, match="flip='both'"):
        extract_features(create_backbone("cpu_resnet", dim=8), torch.zeros(2, 3, 32, 32, dtype=torch.uint8), flip="both")


def _timm_imports():
    try: import timm  # noqa: F401
    except Exception: return False
    return True


@pytest.mark.skipif(not _timm_imports(), reason="timm does not import here (benchmarks/gpu_check.sh runs this on the "
                                                "device image, which has timm)")
def test_timm_backbone_trains_saves_and_loads(tmp_path):
    "A timm architecture as the backbone: random init, two training steps through the trainer, the same embedding after load"
    from bctnb.train import TrainConfig, train
    cfg = TrainConfig.make("smoke", "old", dataset="synthetic", dataset_kw={"num_classes": 20, "per_class": 8},
                           backbone="timm:resnet18", dim=32, max_steps=2)
    run = train(cfg, root=tmp_path)
    bb, _, info = load_model(run)
    assert info["backbone"]["name"] == "timm:resnet18" and bb.dim == 32
    x = torch.randn(3, 3, 32, 32)
    again, _, _ = load_model(run)
    torch.testing.assert_close(bb.eval()(x), again.eval()(x))
