"""Constants and helpers shared by the test modules (conftest.py holds the fixtures; import these from here)."""

# The old model's data and size: 40 synthetic classes × 6 images (smoke preset: batch 32, 4 new-split steps per epoch),
# dim 16 (small and fast; test_train checks a dim-16 mismatch message against it).
OLD_DATA = dict(dataset="synthetic", dataset_kw=dict(num_classes=40, per_class=6))
OLD_DIM = 16


def methods(**where) -> list[str]:
    """Registered (public) method names, optionally filtered on class attributes, e.g. `methods(needs_old=True)`.
    Read at collection time: the same list in every xdist worker."""
    from bctnb.losses import METHODS, available_methods
    return [n for n in available_methods() if all(getattr(METHODS.get(n), k) == v for k, v in where.items())]
