"""Recursive equality for the checkpoint tests: tensors bitwise."""
from __future__ import annotations

import torch


def assert_same(x, y, where: str = "") -> None:
    """x and y are equal, recursively; tensors bitwise, with the same dtype and shape; dicts
    with the same keys in the same order, sequences of the same type and length."""
    if isinstance(x, torch.Tensor):
        assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape, where
        assert torch.equal(x, y), where
    elif isinstance(x, dict):
        assert isinstance(y, dict) and list(x) == list(y), (where, list(x), list(y))
        for key in x:
            assert_same(x[key], y[key], f"{where}[{key!r}]")
    elif isinstance(x, (list, tuple)):
        assert type(x) is type(y) and len(x) == len(y), (where, len(x), len(y))
        for i, (a, b) in enumerate(zip(x, y)):
            assert_same(a, b, f"{where}[{i}]")
    else:
        assert x == y, (where, x, y)
