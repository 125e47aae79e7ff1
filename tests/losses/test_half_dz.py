"""An fp16 head as CUDA runs it: fp16 operands with fp32 results in the chunk GEMMs, and the
logit gradient dz written in fp16 between them. On the CPU the head is upcast to fp32, so
these tests give the CPU CUDA's head (its GEMMs emulated in fp32 from the fp16 operands) and
check every fused loss against the reference on float32 copies. DFT's dz is p_y times CE's and fell below fp16's normal range
(grad_hidden up to 3% off at 37 x 24 x 1000, and off by an unbounded ratio at 67 x 8 x 5003)
until each row of dz was written over a bound of its own size."""

import pytest
import torch

import fastft
from fastft.ops import fused_linear
from fastft.reference import losses as ref

from ..helpers import RTOL, assert_close, check_pair, grads_of, head_inputs
from .test_dft_asft import ref_like
from .test_grpo import rollout

pytestmark = pytest.mark.interpreter
SHAPES = [(37, 24, 1000), (67, 8, 5003), (1, 16, 77)]


@pytest.fixture
def fp16_gemms(monkeypatch):
    def cuda_head(self, weight):
        self.w = weight.contiguous()
        self.mixed = True  # gemm.mm_f32 and addmm_f32_: fp32 results of the half operands
        self.grad_dtype = weight.dtype

    monkeypatch.setattr(fused_linear.Head, "__init__", cuda_head)


@pytest.mark.parametrize("T,H,V", SHAPES)
@pytest.mark.parametrize("name", ["cross_entropy", "dft", "asft"])
def test_cross_entropy_family(backend, fp16_gemms, name, T, H, V):
    h, w, y = head_inputs(T, H, V, torch.float16, ignore_every=4)
    kw = dict(ref_hidden=ref_like(h)) if name == "asft" else {}
    check_pair(getattr(fastft.losses, name), getattr(ref, name), h, w, RTOL[torch.float16], y,
               **kw)


@pytest.mark.parametrize("kw", [dict(label_smoothing=0.1, z_loss=1e-3),
                                dict(softcap=3.0, temperature=0.7), dict(reduction="sum")],
                         ids=str)
def test_dft_options(backend, fp16_gemms, kw):
    h, w, y = head_inputs(53, 16, 2003, torch.float16, ignore_every=3, seed=2)
    check_pair(fastft.losses.dft, ref.dft, h, w, RTOL[torch.float16], y, **kw)


@pytest.mark.parametrize("T,H,V", SHAPES)
def test_otr(backend, fp16_gemms, T, H, V):
    h, w, y = head_inputs(T, H, V, torch.float16, ignore_every=4)
    s = torch.randint(0, V, (T, 3), generator=torch.Generator().manual_seed(5))
    check_pair(lambda *a, **k: fastft.losses.otr(*a, k=3, **k), ref.otr, h, w,
               RTOL[torch.float16], y, samples=s, beta=0.3)


def test_grpo(backend, fp16_gemms):
    h, w, tok, adv, kw = rollout(dtype=torch.float16, beta=0.04)
    h32, w32 = (t.detach().float().requires_grad_() for t in (h, w))
    loss, _ = fastft.losses.grpo(h, w, tok, adv, **kw)
    gh, gw = torch.autograd.grad(loss, (h, w))
    expect, _ = ref.grpo(h32, w32, tok, adv, **kw)
    eh, ew = torch.autograd.grad(expect, (h32, w32))
    assert_close(loss, expect, 2e-3, "loss")
    assert_close(gh, eh.half(), 2e-3, "grad_hidden")
    assert_close(gw, ew.half(), 2e-3, "grad_weight")


def test_masked_rows(backend, fp16_gemms):
    """Masked rows (s = 0 in the normalisation) get zero gradient, the others their own; all
    rows masked give zeros, not NaN."""
    h, w, y = head_inputs(9, 8, 60, torch.float16)
    y[:4] = -100
    gh, gw = grads_of(fastft.losses.dft(h, w, y), (h, w))
    assert not gh[:4].any() and (gh[4:].abs().sum(1) > 0).all()
    y[:] = -100
    gh, gw = grads_of(fastft.losses.dft(h, w, y), (h, w))
    assert not gh.any() and not gw.any()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("name,num_items,h_scale", [
    ("cross_entropy", 2**18, 1.0), ("dft", 2**18, 1.0), ("dft", 2**14, 0.1), ("dft", None, 1.0)])
def test_gradient_accumulation_normaliser_under_gradscaler(backend, fp16_gemms, name, num_items,
                                                           h_scale):
    """HF divides by the tokens of the whole accumulated step (num_items_in_batch) and
    GradScaler multiplies by 2**16 after the op: dz is formed before that scale reaches it,
    so a 1 / 2**18 in it put dz (and grad_W's fp16 operands) among fp16's subnormals:
    grad_hidden came back 15% (CE) to 83% (DFT) off, grad_W 3% to 100%."""
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(512, 64, generator=g) * h_scale).half().requires_grad_()
    w = (torch.randn(3001, 64, generator=g) / 4).half().requires_grad_()
    y = torch.randint(0, 3001, (512,), generator=g)
    kw = {} if num_items is None else {"num_items_in_batch": num_items}
    scale = 2.0**16
    gh, gw = torch.autograd.grad(getattr(fastft.losses, name)(h, w, y, **kw) * scale, (h, w))
    h32, w32 = (t.detach().float().requires_grad_() for t in (h, w))
    eh, ew = torch.autograd.grad(getattr(ref, name)(h32, w32, y, **kw) * scale, (h32, w32))
    assert rel_err(gh, eh) < 2e-3 and rel_err(gw, ew) < 2e-3, (rel_err(gh, eh), rel_err(gw, ew))
