"""RoSTE's model surgery: find the residual stream, fold the norms, merge R1 (METHODS.md §4).

The layout of a Llama-style decoder is read from module names, with no per-model
code: ``model.layers[i]`` with ``input_layernorm`` (read by ``self_attn``'s
q/k/v_proj or fused qkv_proj) and ``post_attention_layernorm`` (read by ``mlp``'s
gate/up_proj or fused gate_up_proj); the writers ``o_proj`` and ``down_proj``;
the final ``norm`` read by the output head. Gemma-2's sandwich norms (a
``pre_feedforward_layernorm`` next to post-norms on the sub-layer outputs) are
recognised: there the post-norms write the residual stream, so they stay in the
unrotated basis and R1 follows them online (a forward hook, one transform per
sub-layer), and o_proj / down_proj are not rotated on their outputs.

Folding: a norm ``y = g * x / rms(x)`` (or Gemma's ``(1 + w)``) moves its scale
``g`` into the columns of every linear that reads it, and becomes 1 (Gemma: w = 0).
The kind of each norm is measured, not assumed, on a probe input; a norm that is
neither (LayerNorm's mean subtraction, a bias) is an error naming it. After the
fold R1 (the normalised Walsh-Hadamard transform H over the hidden size) is
merged: embedding rows e -> H e, reader weights W -> W H^T, writer weights and
biases W -> H W, b -> H b; the RMSNorms in between commute with H. All in fp32,
rounded once to the weights' dtype. A tied output head is untied first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import FastftError, check
from ..ops.hadamard import hadamard, plan
from ..patch import decoder, output_head

SUPPORTED = "Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma-2 and Phi-3"
ATTN = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "q_norm", "k_norm")
MLP = ("gate_proj", "up_proj", "gate_up_proj", "down_proj")


@dataclass
class Block:
    """One decoder layer: its norms and the linears that read and write the residual."""

    index: int
    attn: nn.Module
    attn_norm: tuple[str, nn.Module]
    mlp_norm: tuple[str, nn.Module]
    attn_readers: list[str]  # paths of q/k/v_proj (or qkv_proj)
    mlp_readers: list[str]  # gate/up_proj (or gate_up_proj)
    o_proj: str
    down_proj: str
    v_path: str  # the linear whose rows v_rows are V
    v_rows: tuple[int, int]
    head_dim: int
    post_norms: list[str] = field(default_factory=list)  # Gemma-2: they write the residual


@dataclass
class Layout:
    embed: str
    final_norm: tuple[str, nn.Module]
    head: str
    blocks: list[Block]
    hidden: int


def _path_of(model: nn.Module, module: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name
    raise FastftError(f"{type(module).__name__} is not a submodule of the model")


def _linear(model, path: str) -> nn.Linear:
    m = model.get_submodule(path)
    check(isinstance(m, nn.Linear), f"RoSTE rotates nn.Linear layers; {path} is a "
          f"{type(m).__name__} (RoSTE supports {SUPPORTED})")
    return m


def discover(model: nn.Module) -> Layout:
    """The residual-stream layout of a Llama-style causal LM, or a FastftError naming what
    does not fit."""
    dec = decoder(model)
    dpath = _path_of(model, dec)
    layers = getattr(dec, "layers", None)
    check(isinstance(layers, nn.ModuleList) and len(layers) > 0,
          f"RoSTE needs a decoder with a list of layers (`layers`); {type(model).__name__} has "
          f"none (RoSTE supports {SUPPORTED})")
    embed = model.get_input_embeddings()
    check(isinstance(embed, nn.Embedding), f"RoSTE: {type(model).__name__} has no nn.Embedding "
          "input embedding")
    head = output_head(model)
    check(isinstance(head, nn.Linear), f"RoSTE: {type(model).__name__} has no nn.Linear output "
          "head (lm_head)")
    norm = getattr(dec, "norm", None)
    check(isinstance(norm, nn.Module), f"RoSTE: {type(dec).__name__} has no final `norm` (RoSTE "
          f"supports {SUPPORTED})")
    pre = f"{dpath}.layers" if dpath else "layers"
    blocks = [_block(model, f"{pre}.{i}", i, layer) for i, layer in enumerate(layers)]
    known = {id(p) for p in embed.parameters()} | {id(p) for p in norm.parameters()} | \
        {id(p) for p in layers.parameters()}
    for name, p in dec.named_parameters():
        check(id(p) in known, f"RoSTE: {dpath + '.' if dpath else ''}{name} is a parameter "
              "outside the layers, embedding and final norm, which RoSTE cannot rotate "
              f"(RoSTE supports {SUPPORTED})")
    return Layout(embed=_path_of(model, embed), final_norm=(_path_of(model, norm), norm),
                  head=_path_of(model, head), blocks=blocks, hidden=embed.weight.shape[1])


def _block(model, path: str, i: int, layer: nn.Module) -> Block:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    check(attn is not None and mlp is not None, f"RoSTE: {path} has no self_attn and mlp "
          f"(RoSTE supports {SUPPORTED})")
    names = dict(layer.named_children())
    check("input_layernorm" in names and "post_attention_layernorm" in names,
          f"RoSTE: {path} lacks input_layernorm / post_attention_layernorm (RoSTE supports "
          f"{SUPPORTED})")
    sandwich = "pre_feedforward_layernorm" in names  # Gemma-2: post-norms on both outputs
    mlp_norm = "pre_feedforward_layernorm" if sandwich else "post_attention_layernorm"
    post = [n for n in ("post_attention_layernorm", "post_feedforward_layernorm")
            if sandwich and n in names]
    hd = int(getattr(attn, "head_dim", 0) or 0)
    check(hd > 0, f"RoSTE: {path}.self_attn has no head_dim")
    a = dict(attn.named_children())
    if all(n in a for n in ("q_proj", "k_proj", "v_proj")):
        readers = [f"{path}.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj")]
        v_path = readers[2]
        v_rows = (0, _linear(model, v_path).out_features)
    else:
        check("qkv_proj" in a, f"RoSTE: {path}.self_attn has neither q/k/v_proj nor qkv_proj")
        readers = [f"{path}.self_attn.qkv_proj"]
        v_path = readers[0]
        n_kv = int(getattr(attn, "num_key_value_heads", 0) or
                   model.config.num_key_value_heads)
        out = _linear(model, v_path).out_features
        v_rows = (out - n_kv * hd, out)
    m = dict(mlp.named_children())
    if "gate_proj" in m and "up_proj" in m:
        mlp_readers = [f"{path}.mlp.gate_proj", f"{path}.mlp.up_proj"]
    else:
        check("gate_up_proj" in m, f"RoSTE: {path}.mlp has neither gate_proj/up_proj nor "
              f"gate_up_proj (an MoE or another MLP; RoSTE supports {SUPPORTED})")
        mlp_readers = [f"{path}.mlp.gate_up_proj"]
    check("down_proj" in m and "o_proj" in a, f"RoSTE: {path} lacks o_proj / down_proj")
    for p in readers + mlp_readers + [f"{path}.self_attn.o_proj", f"{path}.mlp.down_proj"]:
        _linear(model, p)
    allowed = {"input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
               "post_feedforward_layernorm"}
    for name, _ in layer.named_parameters():
        parts = name.split(".")
        ok = parts[0] in allowed or (parts[0] == "self_attn" and parts[1] in ATTN) or \
            (parts[0] == "mlp" and parts[1] in MLP)
        check(ok, f"RoSTE: {path}.{name} is a parameter RoSTE does not know how to rotate "
              f"(RoSTE supports {SUPPORTED})")
    return Block(index=i, attn=attn, attn_norm=(f"{path}.input_layernorm", names[
        "input_layernorm"]), mlp_norm=(f"{path}.{mlp_norm}", names[mlp_norm]),
        attn_readers=readers, mlp_readers=mlp_readers, o_proj=f"{path}.self_attn.o_proj",
        down_proj=f"{path}.mlp.down_proj", v_path=v_path, v_rows=v_rows, head_dim=hd,
        post_norms=[f"{path}.{n}" for n in post])


# ---- norms -------------------------------------------------------------------------------

@torch.no_grad()
def norm_kind(path: str, norm: nn.Module) -> str:
    """"scale" (g * x / rms(x)) or "offset" ((1 + w) * x / rms(x)), measured on a probe."""
    params = dict(norm.named_parameters())
    if isinstance(norm, nn.LayerNorm) or "bias" in params:
        raise FastftError(
            f"RoSTE cannot fold {path} ({type(norm).__name__}"
            f"{' with a bias' if params.get('bias') is not None else ''}): a LayerNorm "
            "subtracts the mean and adds a bias, which do not commute with the R1 rotation; "
            f"RoSTE supports RMSNorm models ({SUPPORTED})")
    w = params.get("weight")
    check(w is not None and w.dim() == 1 and len(params) == 1,
          f"RoSTE cannot fold {path} ({type(norm).__name__}): it needs an RMSNorm with one "
          f"weight vector (RoSTE supports {SUPPORTED})")
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, w.shape[0], generator=g) * 8).to(device=w.device, dtype=w.dtype)
    y = norm(x).float()
    xf = x.float()
    base = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True))
    tol = 1e-4 if w.dtype == torch.float32 else 2e-2
    for kind, scale in (("scale", w.float()), ("offset", 1.0 + w.float())):
        want = base * scale
        if ((y - want).abs() <= tol * (want.abs() + 1)).all():
            return kind
    raise FastftError(f"RoSTE cannot fold {path} ({type(norm).__name__}): its output is not "
                      "g * x / rms(x) nor (1 + w) * x / rms(x) on a probe input; RoSTE supports "
                      f"RMSNorm models ({SUPPORTED})")


@torch.no_grad()
def fold_norm(model: nn.Module, path: str, norm: nn.Module, readers: list[str]) -> None:
    """Move the norm's scale into the input columns of ``readers``; the norm becomes 1."""
    kind = norm_kind(path, norm)
    scale = norm.weight.float() + (1.0 if kind == "offset" else 0.0)
    for r in readers:
        lin = model.get_submodule(r)
        lin.weight.copy_((lin.weight.float() * scale).to(lin.weight.dtype))
    norm.weight.fill_(1.0 if kind == "scale" else 0.0)


# ---- R1 ----------------------------------------------------------------------------------

@torch.no_grad()
def rotate_input(lin: nn.Linear) -> None:
    """W -> W H^T: the layer reads H x."""
    lin.weight.copy_(hadamard(lin.weight.float()).to(lin.weight.dtype))


@torch.no_grad()
def rotate_output(lin: nn.Linear) -> None:
    """W -> H W, b -> H b: the layer writes H y."""
    lin.weight.copy_(hadamard(lin.weight.float().t()).t().to(lin.weight.dtype))
    if lin.bias is not None:
        lin.bias.copy_(hadamard(lin.bias.float()).to(lin.bias.dtype))


def untie_head(model: nn.Module, layout: Layout) -> None:
    """Give the head its own weight when it shares the embedding's (their rotations differ
    once the final norm's scale is folded into the head)."""
    head, embed = model.get_submodule(layout.head), model.get_submodule(layout.embed)
    if head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr():
        head.weight = nn.Parameter(embed.weight.detach().clone(),
                                   requires_grad=embed.weight.requires_grad)
    for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        cfg.tie_word_embeddings = False


def online_r1(module: nn.Module):
    """A forward hook: the module's output (a Gemma-2 post-norm's) rotated by H."""
    return module.register_forward_hook(lambda m, args, out: hadamard(out))


def fold_and_rotate(model: nn.Module, layout: Layout, r1: bool = True) -> list:
    """Fold every norm into its readers, then (``r1``) merge R1; returns the hooks of the
    online R1 after Gemma-2's post-norms."""
    if r1:
        plan(layout.hidden)  # a hidden size without a Hadamard factor fails before any change
    untie_head(model, layout)
    for b in layout.blocks:
        fold_norm(model, *b.attn_norm, b.attn_readers)
        fold_norm(model, *b.mlp_norm, b.mlp_readers)
    fold_norm(model, *layout.final_norm, [layout.head])
    hooks = []
    if not r1:
        return hooks
    with torch.no_grad():
        emb = model.get_submodule(layout.embed).weight
        emb.copy_(hadamard(emb.float()).to(emb.dtype))
    rotate_input(model.get_submodule(layout.head))
    for b in layout.blocks:
        for r in b.attn_readers + b.mlp_readers:
            rotate_input(model.get_submodule(r))
        if b.post_norms:
            hooks += [online_r1(model.get_submodule(p)) for p in b.post_norms]
        else:
            rotate_output(model.get_submodule(b.o_proj))
            rotate_output(model.get_submodule(b.down_proj))
    return hooks


def post_norm_hooks(model: nn.Module, paths: list[str]) -> list:
    """The online R1 hooks of a model whose weights already hold R1 (a loaded export)."""
    return [online_r1(model.get_submodule(p)) for p in paths]
