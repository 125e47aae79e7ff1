"""Comparison helpers shared by the tests."""

import torch


def assert_close(actual, expected, rtol, name=""):
    """Elementwise closeness, with atol scaled to the largest reference magnitude."""
    expected = expected.float()
    actual = actual.float()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-12),
                               msg=lambda m: f"{name}: {m}")
