"""The head gradient's GEMM over several chunks of dz at once (fused_linear.grad_w_rows):
the same losses and gradients as one GEMM per chunk and as the reference, for every loss
of the loss head, with the last group of chunks partial and rows ignored."""

import pytest
import torch

import fastft
from fastft.ops import fused_linear
from fastft.reference import losses as ref

from ..helpers import RTOL, assert_close, grads_of, head_inputs


def test_rows_are_whole_chunks_at_least_the_target_at_most_what_t_needs(monkeypatch):
    monkeypatch.delenv("FASTFT_LOSS_GRAD_W_ROWS", raising=False)
    assert fused_linear.grad_w_rows(8192, 512) == 1024  # Llama-3's head at T = 8192: 2 chunks
    assert fused_linear.grad_w_rows(8192, 256) == 1024  # 4 chunks
    assert fused_linear.grad_w_rows(8192, 384) == 1152  # 3 chunks: the first multiple >= 1024
    assert fused_linear.grad_w_rows(8192, 2048) == 2048  # a chunk is enough on its own
    assert fused_linear.grad_w_rows(600, 256) == 768  # T needs 3 chunks only
    assert fused_linear.grad_w_rows(8192, 256, cpu=True) == 256  # the CPU: one chunk
    monkeypatch.setenv("FASTFT_LOSS_GRAD_W_ROWS", "20")
    assert fused_linear.grad_w_rows(50, 7, cpu=True) == 21


def _losses(h, w, y, impl):
    """(name, loss) of each fused loss (and the reference's) on one set of inputs."""
    B, S = 5, h.shape[0] // 5
    adv = torch.linspace(-1, 1, B)
    mask = (y.view(B, S) != -100).float()
    return [
        ("cross_entropy", impl.cross_entropy(h, w, y, label_smoothing=0.1)),
        ("dft", impl.dft(h, w, y)),
        ("asft", impl.asft(h, w, y, ref_hidden=h.detach().roll(1, 0), ref_weight=w.detach() * 0.9,
                           kl_coef=0.1)),
        ("grpo", impl.grpo(h.view(B, S, -1), w, y.clamp(min=0).view(B, S), adv,
                           mask=mask)[0]),
    ]


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_head_gradient_equals_one_gemm_per_chunk_and_the_reference(
        backend, device, dtype, monkeypatch):
    h, w, y = head_inputs(50, 16, 300, dtype, ignore_every=6, seed=3, device=device)
    monkeypatch.setenv("FASTFT_LOSS_CHUNK", "7")  # 8 chunks of 7 rows, the last of 1
    per_chunk = [(n, loss, *grads_of(loss, (h, w))) for n, loss in _losses(h, w, y, fastft.losses)]
    monkeypatch.setenv("FASTFT_LOSS_GRAD_W_ROWS", "20")  # 3 chunks per GEMM: 21, 21 and 8 rows
    grouped = [(n, loss, *grads_of(loss, (h, w))) for n, loss in _losses(h, w, y, fastft.losses)]
    h32, w32 = (t.detach().float().requires_grad_() for t in (h, w))
    expect = [(n, loss, *grads_of(loss, (h32, w32))) for n, loss in _losses(h32, w32, y, ref)]
    for (name, l1, gh1, gw1), (_, l2, gh2, gw2), (_, le, ghe, gwe) in zip(per_chunk, grouped,
                                                                          expect):
        assert_close(l2, l1, 1e-6, f"{name} loss")
        assert_close(gh2, gh1, 1e-6, f"{name} grad_hidden")
        assert_close(gw2, gw1, 1e-5 if dtype == torch.float32 else RTOL[dtype],
                     f"{name} grad_weight")
        assert_close(gw2, gwe, RTOL[dtype], f"{name} grad_weight vs reference")
        assert_close(gh2, ghe, RTOL[dtype], f"{name} grad_hidden vs reference")
        assert_close(l2, le, RTOL[dtype], f"{name} loss vs reference")


def test_otr_grouped_head_gradient(backend, device, monkeypatch):
    h, w, y = head_inputs(30, 8, 100, ignore_every=4, seed=5, device=device)
    monkeypatch.setenv("FASTFT_LOSS_CHUNK", "4")
    monkeypatch.setenv("FASTFT_LOSS_GRAD_W_ROWS", "12")
    loss, s = fastft.losses.otr(h, w, y, k=4, seed=9, return_samples=True)
    gh, gw = grads_of(loss, (h, w), torch.full_like(loss, 1.3))
    expect = ref.otr(h, w, y, samples=s)
    eh, ew = grads_of(expect, (h, w), torch.full_like(expect, 1.3))
    assert_close(loss, expect, 1e-5, "loss")
    assert_close(gh, eh, 1e-5, "grad_hidden")
    assert_close(gw, ew, 1e-5, "grad_weight")


def test_the_workspace_declares_the_grouped_dz():
    """fastft.profile reads the op's declared workspace: on a GPU the dz of 1024 rows (2
    chunks of Llama-3's head at T = 8192) in the head's dtype beside the chunk's logits."""
    from fastft import backends

    T, H, V = 8192, 4096, 128256
    hidden = torch.empty(T, H, dtype=torch.bfloat16, device="meta")
    weight = torch.empty(V, H, dtype=torch.bfloat16, device="meta")
    seen = []
    backends.workspace_listeners.append(seen.append)
    try:
        outs = fused_linear.fake_outputs(hidden, weight, True, True)
        fused_linear.fake_outputs(hidden, weight, True, False)  # head frozen: no grouping
    finally:
        backends.workspace_listeners.remove(seen.append)
    rows = fused_linear.chunk_rows(T, V, H)
    assert rows == 512
    # the logits in fp32 and the grouped dz in bf16; grad_W's fp32 accumulator is the output
    assert seen[0]["cuda"] == rows * V * 4 + 1024 * V * 2
    assert outs[2].dtype == torch.float32 and outs[2].shape == (V, H)
    assert seen[1]["cuda"] == rows * V * 4 + rows * V * 2


@pytest.mark.interpreter
def test_bf16_accumulation_bounds_the_head_gradient_and_stays_close(backend, device,
                                                                     monkeypatch):
    """FASTFT_LOSS_GRAD_W_DTYPE=bf16: a bf16 head's gradient is accumulated in bf16 (half the
    memory of the fp32 default) and scaled in place; it stays within bf16's tolerance of the
    fp32 reference, over several head-gradient GEMMs."""
    h, w, y = head_inputs(50, 16, 300, torch.bfloat16, ignore_every=6, seed=3, device=device)
    monkeypatch.setenv("FASTFT_LOSS_CHUNK", "7")
    monkeypatch.setenv("FASTFT_LOSS_GRAD_W_ROWS", "14")  # 4 GEMMs, each rounding once
    monkeypatch.setenv("FASTFT_LOSS_GRAD_W_DTYPE", "bf16")
    assert fused_linear.grad_w_dtype(torch.bfloat16) == torch.bfloat16
    assert fused_linear.grad_w_dtype(torch.float16) == torch.float32  # fp16 cannot hold it
    assert fused_linear.grad_w_dtype(torch.float32) == torch.float32
    loss = fastft.losses.cross_entropy(h, w, y)
    gh, gw = torch.autograd.grad(loss * 0.5, (h, w))
    h32, w32 = (t.detach().float().requires_grad_() for t in (h, w))
    eh, ew = torch.autograd.grad(ref.cross_entropy(h32, w32, y) * 0.5, (h32, w32))
    assert gw.dtype == torch.bfloat16
    assert_close(gw, ew, RTOL[torch.bfloat16], "grad_weight")
    assert_close(gh, eh, RTOL[torch.bfloat16], "grad_hidden")


def test_a_wrong_grad_w_dtype_is_named(monkeypatch):
    monkeypatch.setenv("FASTFT_LOSS_GRAD_W_DTYPE", "fp8")
    h, w, y = head_inputs(5, 8, 20)
    with pytest.raises(fastft.FastftError, match="FASTFT_LOSS_GRAD_W_DTYPE='fp8'.*fp32.*bf16"):
        fastft.losses.cross_entropy(h, w, y)


def _head_as_on_a_gpu(monkeypatch):
    """The CPU's Head as CUDA builds it for a bf16 head: the weight kept in bf16, fp32 logits
    from the mixed GEMM (fp32 math here), dz in bf16 in its own buffer beside them."""
    def init(self, weight):
        self.w = weight.contiguous()
        self.mixed = True
        self.grad_dtype = self.w.dtype

    monkeypatch.setattr(fused_linear.Head, "__init__", init)


@pytest.mark.parametrize("train_head", [True, False])
@pytest.mark.parametrize("grouped", [False, True])
def test_the_gpus_dz_buffer_over_several_chunks(monkeypatch, train_head, grouped):
    """A bf16 head on a GPU writes dz into a buffer of its own (the logits are fp32): with the
    head frozen (LoRA) or trained, one GEMM per chunk or grouped, every chunk's dz lands in
    it and the gradients equal the reference's."""
    monkeypatch.setenv("FASTFT_BACKEND", "torch")
    monkeypatch.setenv("FASTFT_LOSS_CHUNK", "7")
    if grouped:
        monkeypatch.setenv("FASTFT_LOSS_GRAD_W_ROWS", "14")
    _head_as_on_a_gpu(monkeypatch)
    h, w, y = head_inputs(50, 16, 300, torch.bfloat16, ignore_every=6, seed=3)
    w.requires_grad_(train_head)
    inputs = (h, w) if train_head else (h,)
    got = torch.autograd.grad(fastft.losses.cross_entropy(h, w, y), inputs)
    h32, w32 = (t.detach().float().requires_grad_(t.requires_grad) for t in (h, w))
    want = torch.autograd.grad(ref.cross_entropy(h32, w32, y), (h32, w32) if train_head
                               else (h32,))
    for g, e, name in zip(got, want, ("grad_hidden", "grad_weight")):
        assert_close(g, e, RTOL[torch.bfloat16], name)
