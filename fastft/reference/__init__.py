"""Plain, materialising PyTorch for every op and loss of fastft.

The ground truth of the tests and the baseline of the benchmarks, written
straight from METHODS.md. Never imported by the fast paths.
"""

from . import losses  # noqa: F401
