"""The lora bench suite's cuBLAS + addmm composition computes the LoRA linear and its
gradients as the plain composition does; the CUDA shapes include Llama-3-8B's k/v."""

import torch

from fastft.bench.suites import lora
from fastft.reference import lora as ref

from ..helpers import assert_close


def test_addmm_composition_matches_the_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 48, generator=g).requires_grad_()
    w = torch.randn(40, 48, generator=g) / 7
    a = (torch.randn(8, 48, generator=g) / 7).requires_grad_()
    b = torch.randn(40, 8, generator=g).requires_grad_()
    dy = torch.randn(37, 40, generator=g)
    got = lora.addmm_lora(x, w, a, b, 2.0)
    want = ref.lora_linear(x, w, None, a, b, None, 2.0)
    assert_close(got, want, 1e-5, "y")
    for gg, ww, name in zip(torch.autograd.grad(got, (x, a, b), dy),
                            torch.autograd.grad(want, (x, a, b), dy), "xab"):
        assert_close(gg, ww, 1e-5, f"d{name}")


def test_cuda_shapes_and_providers():
    cases = lora.cases("cuda")
    shapes = {(c.params["n_in"], c.params["n_out"]) for c in cases}
    assert shapes == {(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)}
    assert {c.provider for c in cases} == {"fastft", "reference", "addmm", "peft", "frozen_base"}
