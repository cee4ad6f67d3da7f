"""Constants and helpers shared by the test modules (conftest.py holds the fixtures; import these from here)."""
import numpy as np

# The old model's data and size: 40 synthetic classes × 6 images (smoke preset: batch 32, 4 new-split steps per epoch),
# dim 16 (small and fast; test_train checks a dim-16 mismatch message against it).
OLD_DATA = dict(dataset="synthetic", dataset_kw=dict(num_classes=40, per_class=6))
OLD_DIM = 16


def methods(**where) -> list[str]:
    """Registered (public) method names, optionally filtered on class attributes, e.g. `methods(needs_old=True)`.
    Read at collection time: the same list in every xdist worker."""
    from bctnb.losses import METHODS, available_methods
    return [n for n in available_methods() if all(getattr(METHODS.get(n), k) == v for k, v in where.items())]


def fake_runs(root, methods=("independent", "l2"), dims=(16, 16)):
    """An old run and one new run per method as the trainer leaves them (config.json + model/), random weights from
    save_model, no training: for the tests of evaluation, which need finished run folders, not good models."""
    import torch
    from bctnb.runs import Run
    from bctnb.models import create_backbone, create_head, save_model
    from bctnb.train import TrainConfig
    torch.manual_seed(0)
    base = dict(dataset="synthetic", backbone="cpu_resnet", split_seed=0, test_ratio=0.2)
    old = Run.create("train_old", TrainConfig.make("smoke", role="old", dim=dims[0], **base).to_dict(), root=root)
    save_model(old.path / "model", create_backbone("cpu_resnet", dim=dims[0]), create_head("softmax", dims[0], 11),
               label_map=np.arange(11))
    old.finish()
    news = []
    for m in methods:
        cfg = {**TrainConfig.make("smoke", role="new", dim=dims[1], **base).to_dict(), "method": m,
               "old_run": str(old.path)}
        r = Run.create("train_new", cfg, root=root)
        save_model(r.path / "model", create_backbone("cpu_resnet", dim=dims[1]))
        r.finish()
        news.append(r)
    return old, news
