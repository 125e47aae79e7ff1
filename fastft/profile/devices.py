"""The devices a profile can be costed for: peak dense bf16 FLOP/s, memory bandwidth, memory.

Figures are the vendors' data-sheet numbers for the SXM parts (dense, no
sparsity). ``cpu`` is a nominal two-core AVX2 machine (fp32 FMA peak), for
relative figures only.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import FastftError


@dataclass(frozen=True)
class Device:
    name: str
    flops: float  # peak dense FLOP/s at the profile's dtype (bf16 tensor cores on GPUs)
    bandwidth: float  # bytes/s
    memory: float  # bytes

    def step_seconds(self, flops: float, bytes_moved: float) -> float:
        """The roofline lower bound: the slower of the FLOPs at peak and the bytes at full
        bandwidth (compute and memory traffic overlapping perfectly)."""
        return max(flops / self.flops, bytes_moved / self.bandwidth)

    def no_overlap_seconds(self, flops: float, bytes_moved: float) -> float:
        """The FLOPs at peak plus the bytes at full bandwidth: no overlap at all."""
        return flops / self.flops + bytes_moved / self.bandwidth


GB = 1e9
DEVICES = {
    "h100": Device("h100", 989e12, 3.35e12, 80 * GB),
    "h200": Device("h200", 989e12, 4.8e12, 141 * GB),
    "a100": Device("a100", 312e12, 2.039e12, 80 * GB),
    "cpu": Device("cpu", 0.16e12, 20e9, 24 * GB),
}


def device(name: str) -> Device:
    key = str(name).lower()
    if key not in DEVICES:
        raise FastftError(f"unknown device {name!r}: choose one of {', '.join(DEVICES)}")
    return DEVICES[key]


def parse_bytes(text: str) -> float:
    """'80GB', '80 GiB', '24g', '1.5e10' -> bytes."""
    s = str(text).strip().lower().replace(" ", "")
    units = {"tib": 2**40, "gib": 2**30, "mib": 2**20, "tb": 1e12, "gb": 1e9, "mb": 1e6,
             "t": 1e12, "g": 1e9, "m": 1e6, "b": 1}
    for unit, scale in units.items():
        if s.endswith(unit):
            s, mult = s[: -len(unit)], scale
            break
    else:
        mult = 1
    try:
        value = float(s) * mult
    except ValueError:
        value = -1
    if value <= 0:
        raise FastftError(f"--fit {text!r}: give a memory size such as 80GB or 24GiB")
    return value
