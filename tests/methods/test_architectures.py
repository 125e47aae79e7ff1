"""fastft.prepare on many transformers architectures, LoRA on all-linear.

For each tiny random model (hidden 32, 2 layers, eager attention): the adapted
layers are the expected ones; the fused loss equals the unpatched model's own;
only adapter parameters get gradients; and after a few optimizer steps the
logits equal PEFT's on the adapter that fastft saved. The module prints the
table architecture | prepare | loss equal | PEFT logits equal | only adapter grads.
GPT-2's Conv1D (weight [in, out]) is also checked at the layer level on both
backends of the fused op, and Phi's biased output head against the model's own
loss and gradients.
"""

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

import fastft
from fastft.methods import lora_sb
from fastft.methods.lora import LoRALinear, adapter_layers
from fastft.reference import lora as ref_lora

from ..helpers import assert_close
from ..tiny_models import ARCHS, MORE_ARCHS, batch, tiny

LLAMA_LIKE = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
EXPECTED = {  # what "all-linear" adapts: every nn.Linear / Conv1D but the output head
    **{arch: LLAMA_LIKE for arch in ("llama", "qwen2", "mistral", "gemma", "qwen3", "gemma2")},
    "phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},
    "phi": {"q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"},
    "gpt2": {"c_attn", "c_proj", "c_fc"},  # Conv1D
    "gpt_neox": {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"},
    "opt": {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"},
    "falcon": {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"},
    # experts are 3-D parameters and the router a MixtralTopKRouter: attention only
    "mixtral": {"q_proj", "k_proj", "v_proj", "o_proj"},
    # the same, plus the shared expert's nn.Linear layers and its gate
    "qwen2_moe": LLAMA_LIKE | {"shared_expert_gate"},
}
ARCH_NAMES = list(ARCHS) + list(MORE_ARCHS)
COLUMNS = ("prepare", "loss equal", "PEFT logits equal", "only adapter grads")
TABLE: dict[str, dict[str, str]] = {}


@pytest.fixture(scope="module", autouse=True)
def table(request):
    """Print the table of results at the end of the module (shown with or without -s)."""
    yield
    if not TABLE:
        return
    rows = ["", "| architecture | " + " | ".join(COLUMNS) + " |",
            "|---" * (len(COLUMNS) + 1) + "|"]
    for arch in ARCH_NAMES:
        if arch in TABLE:
            rows.append(f"| {arch} | " + " | ".join(TABLE[arch].get(c, "not run")
                                                     for c in COLUMNS) + " |")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print("\n".join(rows))


def record(arch, column, check):
    """Run ``check``; note pass / FAIL (with the reason) in the table, and re-raise."""
    try:
        check()
    except BaseException as e:
        TABLE.setdefault(arch, {})[column] = f"FAIL: {str(e).splitlines()[0][:80]}"
        raise
    TABLE.setdefault(arch, {})[column] = "pass"


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_prepare_loss_and_gradients(arch):
    model = tiny(arch)
    plain = copy.deepcopy(model)
    ids, labels = batch()
    want = plain(input_ids=ids, labels=labels).loss
    want_ce = F.cross_entropy(plain(input_ids=ids).logits[:, :-1].flatten(0, 1),
                              labels[:, 1:].flatten())

    def prepare():
        fastft.prepare(model, fastft.LoRA(r=4, target_modules="all-linear"))
        assert {p.rsplit(".", 1)[-1] for p in adapter_layers(model)} == EXPECTED[arch]
        assert not isinstance(model.get_output_embeddings(), LoRALinear)
    record(arch, "prepare", prepare)

    got = model(input_ids=ids, labels=labels)

    def loss_equal():
        assert got.logits is None  # the fused loss: no [B, S, V] logits
        assert_close(got.loss, want, 1e-5, "loss vs the model's own")
        assert_close(got.loss, want_ce, 1e-5, "loss vs F.cross_entropy on its logits")
    record(arch, "loss equal", loss_equal)

    def only_adapter_grads():
        got.loss.backward()
        for name, p in model.named_parameters():
            is_adapter = name.endswith(("lora_A", "lora_B"))
            assert (p.grad is not None) == is_adapter, name
            if name.endswith("lora_B"):  # B = 0 at init: its gradient is the one that moves
                assert p.grad.abs().max() > 0, name
    record(arch, "only adapter grads", only_adapter_grads)


@pytest.mark.peers
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_peft_logits_equal_after_training(arch, tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny(arch)
    base = copy.deepcopy(model)
    ids, labels = batch()
    fastft.prepare(model, fastft.LoRA(r=4, alpha=8))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
    ours = logits(model, ids)
    assert (ours - logits(base, ids)).abs().max() > 1e-3  # the adapters changed the model

    def peft_equal():
        fastft.save_adapter(model, tmp_path)
        theirs = peft.PeftModel.from_pretrained(base, tmp_path)
        assert_close(logits(theirs, ids), ours, 1e-5, "PEFT logits")
    record(arch, "PEFT logits equal", peft_equal)


@pytest.mark.peers
def test_peft_moe_adapter_on_3d_experts_is_refused(tmp_path):
    """PEFT's all-linear on a transformers-5 Mixtral adapts the router and the 3-D experts
    (target_parameters), which fastft does not: loading it is a clear error."""
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(tiny("mixtral"), peft.LoraConfig(r=4, target_modules="all-linear"))
    theirs.save_pretrained(tmp_path)
    with pytest.raises(fastft.FastftError, match="target_parameters"):
        fastft.load_adapter(tiny("mixtral"), tmp_path)


def test_conv1d_layer_on_both_backends(backend, device):
    """A Conv1D base (weight [in, out]) gives x W0 + b + s B A x and its gradients."""
    torch.manual_seed(0)
    base = Conv1D(nf=9, nx=7).to(device)
    torch.nn.init.normal_(base.bias)
    layer = LoRALinear(base, r=3, alpha=6)
    assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (7, 9)
    assert layer.lora_A.shape == (3, 7) and layer.lora_B.shape == (9, 3)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 5, 7, device=device, requires_grad=True)
    y = layer(x)
    x2 = x.detach().clone().requires_grad_()
    a, b = (t.detach().clone().requires_grad_() for t in (layer.lora_A, layer.lora_B))
    want = ref_lora.lora_linear(x2, base.weight.t(), base.bias, a, b, None, layer.scaling)
    assert_close(y, want, 1e-5, "y")
    dy = torch.randn_like(want)
    got_grads = torch.autograd.grad(y, (x, layer.lora_A, layer.lora_B), dy)
    want_grads = torch.autograd.grad(want, (x2, a, b), dy)
    for name, g, w in zip(("dx", "dA", "dB"), got_grads, want_grads):
        assert_close(g, w, 1e-5, name)
    assert base.weight.grad is None
    # delta_weight is in the base's layout: merging it into W0 [in, out] gives the same y
    with torch.no_grad():
        y0 = layer(x)
        layer.merge()
        assert_close(layer(x), y0, 1e-5, "merged")
        assert_close(base(x), y0, 1e-5, "merged W0")


def test_conv1d_under_autocast():
    model = tiny("gpt2")
    fastft.prepare(model, fastft.LoRA(r=4))
    layer = model.transformer.h[0].attn.c_attn
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 32)
    want = ref_lora.lora_linear(x, layer.w0(), layer.base_layer.bias, layer.lora_A,
                                layer.lora_B, None, layer.scaling)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x)
    assert got.dtype == torch.bfloat16
    assert_close(got, want, 2e-2, "bf16 autocast")


def test_gpt2_merge_and_lora_sb_orientation():
    """Merge folds B A into a Conv1D weight transposed; LoRA-SB reads its gradient as [in, out]."""
    ids, labels = batch()
    model = tiny("gpt2")
    fastft.prepare(model, fastft.LoRA(r=4))
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora_B.normal_(std=0.05)
    before = logits(model, ids)
    merged = fastft.merge(model)
    assert type(merged.transformer.h[0].attn.c_attn) is Conv1D
    assert_close(logits(merged, ids), before, 1e-5, "merged GPT-2")

    model, plain = tiny("gpt2"), tiny("gpt2")
    fastft.prepare(model, fastft.LoRASB(r=3, target_modules=["c_attn"]))
    lora_sb.initialize(model, [{"input_ids": ids, "labels": labels}], total_steps=10, n_init=2)
    (plain(input_ids=ids, labels=labels).loss / 2).backward()
    for path, layer in adapter_layers(model).items():
        dw_t = -torch.sign(plain.get_submodule(path).weight.grad)  # Conv1D: already [in, out]
        u, s, vh = torch.linalg.svd(dw_t, full_matrices=False)
        best = (u[:, :3] * s[:3]) @ vh[:3]
        approx = layer.delta_weight().detach()  # [in, out] for a Conv1D, up to the scale lr_eff
        cos = F.cosine_similarity(approx.flatten(), best.flatten(), 0)
        assert cos > 0.99, (path, cos.item())


def test_biased_head_loss_and_gradients_equal_the_models():
    """Phi's lm_head has a bias: the fused loss takes it, and its gradient is the model's."""
    model = tiny("phi")
    assert model.lm_head.bias is not None
    with torch.no_grad():
        model.lm_head.bias.normal_()  # a bias that matters
    plain = copy.deepcopy(model)
    ids, labels = batch()
    want = plain(input_ids=ids, labels=labels).loss
    fastft.prepare(model, fastft.Full())
    got = model(input_ids=ids, labels=labels)
    assert got.logits is None
    assert_close(got.loss, want, 1e-5)
    got.loss.backward()
    want.backward()
    for (n, p), (_, q) in zip(model.named_parameters(), plain.named_parameters()):
        assert_close(p.grad, q.grad, 1e-4, n)
    assert model.lm_head.bias.grad.abs().max() > 0
