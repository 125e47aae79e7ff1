"""RoSTE (METHODS.md §4): rotations that leave the float model unchanged, straight-through
quantizers, the adaptive rotation choice, export / load, bad input and a Trainer run.

Tiny random models (hidden 32, 2 layers); the norms get random scales first, so that the
fold is exercised, and Qwen2's q/k/v biases random values (R2 rotates v's).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastft
from fastft import FastftError
from fastft.methods.roste_layers import QuantConfig, RoSTELinear, rotate_cols, rotate_rows
from fastft.ops.fake_quant import fake_quant_act, fake_quant_weight
from fastft.ops.hadamard import hadamard
from fastft.quantize.packing import codes, pack, unpack

from ..tiny_models import batch, tiny

INVARIANT = ["llama", "qwen2", "gemma2", "mistral", "phi3", "gemma", "qwen3"]


def randomize(model, seed=1):
    """Norm scales far from 1 (Gemma's (1 + w): w far from 0) and non-zero biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (0.0 if "gemma" in
                        type(model).__name__.lower() else 1.0))
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("arch", INVARIANT)
def test_rotations_leave_the_float_model_unchanged(arch):
    model = randomize(tiny(arch))
    plain = copy.deepcopy(model)
    ids, _ = batch()
    want = logits(plain, ids)
    fastft.prepare(model, fastft.RoSTE(rotations="all", quantize=False))
    assert model.config._attn_implementation == "fastft_roste_eager"
    assert rel_err(logits(model, ids), want) < 1e-5
    # the weights did change: R1 is merged, the norms are folded (1, Gemma's w = 0)
    emb, emb0 = model.get_input_embeddings().weight, plain.get_input_embeddings().weight
    assert (emb - emb0).abs().max() > 1e-3
    norm = model.model.layers[0].input_layernorm.weight
    assert torch.all(norm == (0.0 if "gemma" in arch else 1.0))
    # and with the quantizers on, the model is a different (quantized) function
    quant = randomize(tiny(arch))
    fastft.prepare(quant, fastft.RoSTE(rotations="all", w_bits=4, a_bits=4, kv_bits=4))
    assert rel_err(logits(quant, ids), want) > 1e-3


def test_rotations_none_is_plain_quantization_aware_training():
    model = randomize(tiny("llama"))
    plain = copy.deepcopy(model)
    ids, _ = batch()
    method = fastft.RoSTE(rotations="none", quantize=False)
    fastft.prepare(model, method)
    assert torch.equal(logits(model, ids), logits(plain, ids))  # nothing folded or rotated
    assert method.chosen == {"r2": [], "r3": [], "r4": []}


def test_generate_with_the_cache_equals_the_full_forward():
    """Per-token quantizers: decoding step by step (K, V from the cache) gives the logits of
    one forward over the whole sequence."""
    model = tiny("llama")
    fastft.prepare(model, fastft.RoSTE(rotations="all"))
    ids, _ = batch(B=1, S=6)
    out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, use_cache=True,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    full = logits(model, out.sequences)
    for i, step in enumerate(out.logits):
        assert torch.allclose(step[0], full[0, 5 + i], atol=1e-4)


def test_invariance_with_sdpa_padding_and_a_tied_head():
    model = randomize(tiny("llama", tie_word_embeddings=True))
    model.config._attn_implementation = "sdpa"
    assert model.lm_head.weight is model.model.embed_tokens.weight
    plain = copy.deepcopy(model)
    ids, _ = batch()
    mask = torch.ones_like(ids)
    mask[0, -4:] = 0
    want = logits(plain, ids, attention_mask=mask)
    fastft.prepare(model, fastft.RoSTE(rotations="all", quantize=False))
    assert model.config._attn_implementation == "fastft_roste_sdpa"
    assert model.lm_head.weight is not model.model.embed_tokens.weight  # untied
    assert not model.config.tie_word_embeddings
    assert rel_err(logits(model, ids, attention_mask=mask), want) < 1e-5


def test_linear_is_straight_through_the_quantizers_and_rotations():
    """Forward q_a(H x) q_w(rot W)^T + rot b; gradients: identity through q, then the
    transposed rotations (to x, to the master W and b), as plain autograd gives them."""
    torch.manual_seed(0)
    qcfg = QuantConfig(w_bits=4, a_bits=4, kv_bits=None)
    base = nn.Linear(16, 24)
    layer = RoSTELinear(base, qcfg, layer=0, role="qkv_proj")
    layer.head_dim, layer.v_rows = 8, (8, 24)
    layer.r2_out = layer.r4 = layer.r4_input = True
    x = torch.randn(3, 5, 16, requires_grad=True)
    y = layer(x)
    dy = torch.randn_like(y)
    gx, gw, gb = torch.autograd.grad(y, (x, layer.weight, layer.bias), dy)

    x2 = x.detach().clone().requires_grad_()
    w2, b2 = base.weight.detach().clone().requires_grad_(), base.bias.detach().clone() \
        .requires_grad_()
    wr = rotate_cols(rotate_rows(w2, (8, 24), 8), None)
    wq = wr + (fake_quant_weight(wr.detach(), 4) - wr).detach()
    xr = hadamard(x2)
    xq = xr + (fake_quant_act(xr.detach(), 4) - xr).detach()
    want = F.linear(xq, wq, rotate_rows(b2, (8, 24), 8))
    assert torch.allclose(y, want, atol=1e-6)
    ex, ew, eb = torch.autograd.grad(want, (x2, w2, b2), dy)
    for got, exp, name in ((gx, ex, "x"), (gw, ew, "weight"), (gb, eb, "bias")):
        assert torch.allclose(got, exp, atol=1e-5), name


def test_quantized_weight_is_cached_until_the_weight_changes():
    qcfg = QuantConfig(w_bits=4, a_bits=None, kv_bits=None)
    layer = RoSTELinear(nn.Linear(16, 8), qcfg, layer=0, role="down_proj")
    layer.r4 = True
    x = torch.randn(2, 16)
    layer(x).sum().backward()
    first = layer._cache[1]
    layer(x).sum().backward()  # a second micro-batch: the same tensor, no recompute
    assert layer._cache[1] is first
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1, fused=True)  # no _version bump
    opt.step()
    layer(x)
    assert layer._cache[1] is not first
    fresh = fake_quant_weight(hadamard(layer.weight.detach()), 4)
    assert torch.equal(layer._cache[1], fresh)
    with torch.no_grad():
        layer.weight.mul_(2.0)  # an in-place edit
    layer(x)
    assert torch.equal(layer._cache[1], fake_quant_weight(hadamard(layer.weight.detach()), 4))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_an_unrotated_layer_quantizes_its_weight_in_its_own_dtype(dtype):
    """Without a weight-side rotation or an adapter, the weight is quantized as it is (no
    fp32 copy and back): the same bits as the fp32 round trip, and the straight-through
    gradient is the upstream gradient itself."""
    qcfg = QuantConfig(w_bits=4, a_bits=None, kv_bits=None)
    layer = RoSTELinear(nn.Linear(48, 40), qcfg, layer=0, role="up_proj").to(dtype)
    assert layer.unrotated()
    want = layer.quantized_fp32(None)[1].to(dtype)
    x = torch.randn(3, 48, dtype=dtype)
    y = layer(x)
    assert torch.equal(layer._cache[1], want)
    g = torch.randn_like(y)
    y.backward(g)
    wq = want.clone().requires_grad_()
    F.linear(x, wq, layer.bias.detach()).backward(g)  # straight through the quantizer
    assert torch.equal(layer.weight.grad, wq.grad)
    rotated = RoSTELinear(nn.Linear(48, 40), qcfg, layer=0, role="down_proj").to(dtype)
    rotated.r4 = True
    assert not rotated.unrotated()


def test_attention_rotates_q_k_and_quantizes_k_v_straight_through():
    from fastft.methods.roste_layers import AttnQuant, roste_attention

    torch.manual_seed(0)
    mod = nn.Module()
    mod.is_causal, mod.training = True, False
    mod._fastft_roste = st = AttnQuant(QuantConfig(kv_bits=4), layer=0, original="sdpa")
    st.r3 = True
    q, k, v = (torch.randn(1, 2, 5, 8, requires_grad=True) for _ in range(3))
    out, _ = roste_attention(mod, q, k, v, None, scaling=8**-0.5)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    kr = hadamard(k2)
    kq = kr + (fake_quant_act(kr.detach(), 4) - kr).detach()
    vq = v2 + (fake_quant_act(v2.detach(), 4) - v2).detach()
    want = F.scaled_dot_product_attention(hadamard(q2), kq, vq, is_causal=True,
                                          scale=8**-0.5).transpose(1, 2)
    assert torch.allclose(out, want, atol=1e-6)
    for got, exp in zip((dq, dk, dv), torch.autograd.grad(want, (q2, k2, v2),
                                                           torch.ones_like(want))):
        assert torch.allclose(got, exp, atol=1e-5)


def test_adaptive_keeps_a_rotation_only_where_it_lowers_the_error():
    """Layer 0: one input channel of down_proj's weight 30x the others (an outlier column:
    each row's range is set by it): R4 (W H^T) spreads it over the row, the error drops.
    Layer 1: down_proj's weight takes two values per row (exact at 4 bits) and R4 would mix
    them: the error rises. R4 stays on layer 0 only."""
    model = tiny("llama")
    method = fastft.RoSTE(w_bits=4, a_bits=4, kv_bits=4, rotations="adaptive")
    fastft.prepare(model, method)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:, 5] *= 30.0
        down = model.model.layers[1].mlp.down_proj.weight
        down.copy_(torch.sign(torch.randn(down.shape, generator=g)) * 0.1)
    ids, _ = batch(B=4, S=16)
    chosen = method.calibrate(model, [{"input_ids": ids[:2]}, {"input_ids": ids[2:]}])
    err = method.calibration
    assert err["all"]["r4/0"] < err["r1"]["r4/0"]
    assert err["all"]["r4/1"] > err["r1"]["r4/1"]
    assert chosen["r4"] == [0]
    assert model.model.layers[0].mlp.down_proj.r4 and not model.model.layers[1].mlp.down_proj.r4
    for kind in ("r2", "r3"):  # every choice follows the measured errors
        assert chosen[kind] == [i for i in (0, 1)
                                if err["all"][f"{kind}/{i}"] < err["r1"][f"{kind}/{i}"]]
    assert method.calibrate(model, []) is chosen  # chosen once
    state = method.state_dict()
    again = fastft.RoSTE(rotations="adaptive")
    other = tiny("llama")
    fastft.prepare(other, again)
    again.load_state_dict(state)  # a resume restores the choice
    assert again.chosen == chosen and other.model.layers[0].mlp.down_proj.r4


@pytest.mark.parametrize("arch", ["phi3", "llama"])  # a fused qkv_proj; separate q, k, v
def test_adaptive_r2_error_is_o_projs_weight_and_input_and_vs_rows(arch):
    """R2's calibration error, by hand: MSE(q(W) - W) of V's rows (only those of a fused
    qkv_proj) and of o_proj's weight, rotated per head or not, plus the mean over batches
    of MSE(q(x) - x) of o_proj's input; nothing of the V cache."""
    model = tiny(arch)
    method = fastft.RoSTE(w_bits=4, a_bits=4, kv_bits=4, rotations="adaptive")
    fastft.prepare(model, method)
    rt = method.runtime(model)
    with torch.no_grad():  # Q's and K's rows far larger than V's: counted, they would rule
        for b in rt.layout.blocks:
            w = rt.linears[b.v_path].weight
            w[:b.v_rows[0]] *= 50.0
    inputs = {b.index: [] for b in rt.layout.blocks}
    for b in rt.layout.blocks:
        rt.linears[b.o_proj].register_forward_pre_hook(
            lambda mod, args, i=b.index: inputs[i].append(args[0].detach().clone()))
    ids, _ = batch(B=4, S=16)
    method.calibrate(model, [{"input_ids": ids[:2]}, {"input_ids": ids[2:]}])

    def mse(a, b):
        return float((a - b).pow(2).mean())

    for b in rt.layout.blocks:
        v = rt.linears[b.v_path].weight.detach().float()
        o = rt.linears[b.o_proj].weight.detach().float()
        s, e = b.v_rows
        assert (arch == "phi3") == (s > 0)
        for mode, xs in (("r1", inputs[b.index][:2]), ("all", inputs[b.index][2:])):
            vr = v if mode == "r1" else rotate_rows(v, b.v_rows, b.head_dim)
            orr = o if mode == "r1" else rotate_cols(o, b.head_dim)
            vr = vr[s:e]
            want = (mse(fake_quant_weight(vr, 4, False, 1.0), vr)
                    + mse(fake_quant_weight(orr, 4, False, 1.0), orr)
                    + sum(mse(fake_quant_act(x, 4, False, 1.0), x) for x in xs) / len(xs))
            got = method.calibration[mode][f"r2/{b.index}"]
            assert abs(got - want) <= 1e-6 * want, (mode, b.index, got, want)


def _train(model, steps=2, lr=1e-2):
    ids, labels = batch()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.mark.parametrize("arch,kw", [
    ("qwen2", dict(w_bits=4, rotations="all")),  # R2 on the v bias
    ("gemma2", dict(w_bits=8, a_bits=8, kv_bits=8, rotations="all")),  # online R1, uint8
    ("phi3", dict(w_bits=3, symmetric=True, clip_ratio=0.9, rotations="r1")),  # fused qkv
    ("llama", dict(w_bits=4, adapter=fastft.LoRA(r=4))),  # adapters merged, then quantized
    ("mistral", dict(quantize=False, rotations="all")),  # float: R2, R4 merged into weights
])
def test_export_load_round_trip(arch, kw, tmp_path):
    model = randomize(tiny(arch))
    method = fastft.RoSTE(**kw)
    fastft.prepare(model, method)
    if method.chosen is None:
        method.calibrate(model, [{"input_ids": batch()[0]}])
    _train(model)
    ids, _ = batch(seed=3)
    want = logits(model, ids)
    folder = fastft.quantize.export(model, tmp_path / "q")
    loaded = fastft.quantize.load(folder)
    assert torch.equal(logits(loaded, ids), want)
    from safetensors.torch import load_file

    tensors = load_file(folder / "model.safetensors")
    assert not any("lora" in k or "base_layer" in k for k in tensors)
    bits = kw.get("w_bits") if kw.get("quantize", True) else None
    assert loaded.config.fastft_quantization["w_bits"] == bits
    if bits is None:
        assert not any(k.endswith("qweight") for k in tensors)
        return
    name = next(k for k in tensors if k.endswith("down_proj.qweight"))
    assert tensors[name].dtype == torch.uint8
    assert tensors[name].shape[1] == (32 if bits <= 4 else 64)  # down_proj: in 64


def test_packing_and_codes_are_exact():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 11, generator=g)
    for bits in (2, 4, 5, 8):
        for sym in (False, True):
            wq = fake_quant_weight(w, bits, sym, 0.8)
            c, s, z = codes(w, wq, bits, sym, 0.8)
            assert torch.equal(unpack(pack(c, bits), bits, 11), c)
            assert torch.equal((c.float() - z[:, None]) * s[:, None], wq)
    with pytest.raises(FastftError, match="not \\(c - z\\) s"):
        codes(w, w, 4, False, 1.0)  # not a quantized weight


def test_bad_input(tmp_path):
    for kw in (dict(w_bits=1), dict(a_bits=9), dict(kv_bits=4.0), dict(rotations="foo"),
               dict(clip_ratio=0.0), dict(adapter=fastft.LoRASB(r=4)),
               dict(adapter=fastft.LoRA(dropout=0.1))):
        with pytest.raises(FastftError):
            fastft.RoSTE(**kw)
    with pytest.raises(FastftError, match="w_bits"):
        fastft.TrainConfig(method="roste", w_bits=9)
    with pytest.raises(FastftError, match="rotations"):
        fastft.TrainConfig(method="roste", rotations="foo")
    model = tiny("llama")
    model.model.layers[1].post_attention_layernorm = nn.LayerNorm(32)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(FastftError, match="post_attention_layernorm.*LayerNorm with a bias"):
        fastft.prepare(model, fastft.RoSTE())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # untouched
    model = tiny("llama")
    model.model.layers[0].input_layernorm = nn.LayerNorm(32, bias=False)
    with pytest.raises(FastftError, match="cannot fold model.layers.0.input_layernorm"):
        fastft.prepare(model, fastft.RoSTE())
    with pytest.raises(FastftError, match="RoSTE"):
        fastft.prepare(tiny("phi"), fastft.RoSTE())  # LayerNorm, no post_attention_layernorm
    with pytest.raises(FastftError, match="gate_proj"):
        fastft.prepare(tiny("mixtral"), fastft.RoSTE())  # an MoE
    tiny("llama").save_pretrained(tmp_path / "plain")
    with pytest.raises(FastftError, match="not a fastft quantized model"):
        fastft.quantize.load(tmp_path / "plain")
    with pytest.raises(FastftError, match="prepared with fastft.prepare"):
        fastft.quantize.export(tiny("llama"), tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_trainer_runs_roste_resumes_and_saves_the_quantized_model(tmp_path):
    """Two steps with method="roste" (adaptive rotations calibrated on the data); the end of
    the run writes <output>/quantized, whose model gives the trained model's logits; a run
    resumed from step 1 (the choice restored, not re-measured) logs the same losses."""
    from fastft import TrainConfig, Trainer

    from ..train.helpers import read_metrics, tiny_setup, write_data

    data = str(write_data(tmp_path, n=8))

    def run(out, **kw):
        model, tok = tiny_setup()
        cfg = TrainConfig(method="roste", w_bits=4, a_bits=8, kv_bits=8, rotations="adaptive",
                          calibration_samples=8, max_steps=2, batch_size=4, lr=1e-3,
                          progress=False, max_length=16, output_dir=str(out), **kw)
        return model, tok, Trainer(model, tok, data, cfg).train()

    model, tok, summary = run(tmp_path / "run", save_every=1)
    losses = [r["loss"] for r in read_metrics(tmp_path / "run")]
    method = model._fastft.method
    assert isinstance(method, fastft.RoSTE) and method.chosen is not None
    assert summary["quantized"] == str(tmp_path / "run" / "quantized")
    loaded = fastft.quantize.load(summary["quantized"])
    ids = torch.tensor([tok("12+34=")["input_ids"]])
    model.eval()
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    assert (tmp_path / "run" / "quantized" / "tokenizer_config.json").exists()

    _, _, again = run(tmp_path / "run", resume_from=str(tmp_path / "run" / "checkpoint-1"))
    assert again["final_loss"] == summary["final_loss"]
    assert [r["loss"] for r in read_metrics(tmp_path / "run")] == losses


def test_trainer_under_cpu_bf16_autocast_follows_fp32(tmp_path):
    """The GPU path's CPU stand-in: bf16 autocast around the quantized layers (the
    quantizers compute in fp32 and F.linear casts their outputs) gives the fp32 run's losses
    within bf16 rounding; the weights stay fp32."""
    from fastft import TrainConfig, Trainer

    from ..train.helpers import read_metrics, tiny_setup, write_data

    data, runs = str(write_data(tmp_path, n=8)), {}
    for bf16 in ("true", "false"):
        model, tok = tiny_setup()
        cfg = TrainConfig(method="roste", rotations="all", batch_size=4, max_steps=2, lr=1e-3,
                          warmup_ratio=0.0, schedule="constant", progress=False, max_length=16,
                          bf16=bf16, output_dir=str(tmp_path / bf16))
        Trainer(model, tok, data, cfg).train()
        runs[bf16] = read_metrics(tmp_path / bf16)
        assert all(p.dtype == torch.float32 for p in model.parameters())
    for a, b in zip(runs["true"], runs["false"]):
        assert abs(a["loss"] - b["loss"]) <= 2e-2 * abs(b["loss"])

