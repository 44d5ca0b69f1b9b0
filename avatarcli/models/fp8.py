"""Opt-in fp8 inference of the Wan DiT blocks (`--precision fp8`): float8 linear layers and fp8 self-attention.

At 480x832 the 3-branch window-step is ~70% self-attention FLOPs (32760 tokens per branch) and ~30% linear layers,
so both run in fp8 e4m3 on Hopper-class GPUs (compute capability >= 8.9):
  * linear layers of every block (q/k/v/o of both attentions, the feed-forward): torchao's float8 inference
    (dynamic per-row activation scales, per-row weight scales, `torch._scaled_mm`);
  * self-attention: cuDNN's fused fp8 SDPA through the cuDNN frontend (package `nvidia-cudnn-frontend`), with
    per-tensor scales: q, k, v are scaled to the e4m3 range by their absolute maximum, the softmax probabilities by
    448 (they lie in [0, 1]), the output by the bound max|v| (each output row is a convex combination of v's rows).
    Before quantizing, k and v are smoothed (`smooth_kv`, as SageAttention does for k): each loses its mean over the
    tokens per batch, head and channel, and v's mean is added back to the output. Exact without rounding (a
    per-row constant added to the scores leaves the softmax unchanged; each row of the probabilities sums to 1), and
    e4m3's relative rounding error then scales with the spread of k and v about their means, not with their offset.
The cross-attentions (512 text, 257 image, 15 audio keys) stay in bf16: they are a few percent of the work.
Embeddings, the audio adapter and the output head stay in their dtype.

`kernel="emulate"` rounds the same tensors to e4m3 with the same scales and computes in the model's dtype: no speed,
but it runs anywhere (CPU) and isolates the rounding error of the scheme from the kernels.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from avatarcli.errors import EnvironmentProblem

E4M3_MAX = 448.0  # largest finite float8_e4m3fn
# Linear layers of a Wan block that run in fp8 (fused and unfused names; the unused ones are simply not called).
_BLOCK_LINEARS = re.compile(r"blocks\.\d+\.(attn1\.(to_q|to_k|to_v|to_qkv|to_out\.0)|attn2\.(to_q|to_out\.0)"
                            r"|ffn\.net\.0\.proj|ffn\.net\.2)$")
KERNELS = ("native", "emulate")


def check_fp8_support(device: torch.device, attention: bool = True) -> None:
    """Raise EnvironmentProblem (exit 3) unless this machine can run the fp8 kernels."""
    if device.type != "cuda":
        raise EnvironmentProblem("--precision fp8 needs a CUDA GPU (compute capability 8.9 or newer, e.g. L40S, H100, "
                                 "H200); use the default precision on this device")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise EnvironmentProblem(f"--precision fp8 needs compute capability 8.9 or newer; this GPU has {major}.{minor}")
    from importlib.util import find_spec

    if find_spec("torchao") is None:
        raise EnvironmentProblem("--precision fp8 needs torchao for its float8 linear layers: pip install torchao")
    if attention and find_spec("cudnn") is None:
        raise EnvironmentProblem("--precision fp8 needs the cuDNN frontend for fp8 attention: pip install "
                                 "nvidia-cudnn-frontend")


def kernel_for(device: torch.device) -> str:
    """The fp8 kernel to run on `device`: "native" on a CUDA GPU that can run it (else EnvironmentProblem, exit 3),
    "emulate" elsewhere (the same rounding in the model's dtype, for checks on the CPU)."""
    if device.type != "cuda":
        return "emulate"
    check_fp8_support(device)
    return "native"


def is_block_linear(module: nn.Module, name: str) -> bool:
    return isinstance(module, nn.Linear) and bool(_BLOCK_LINEARS.search(name)) \
        and module.in_features % 16 == 0 and module.out_features % 16 == 0


def to_e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * scale rounded to float8 e4m3 (saturating at +-448)."""
    return (x.float() * scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def tensor_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-tensor scale mapping max|x| to the e4m3 maximum (float32 scalar tensor, no host sync)."""
    return E4M3_MAX / x.detach().abs().amax().float().clamp_min(1e-12)


def emulated(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x rounded through e4m3 with `scale`, back in x's dtype."""
    return (to_e4m3(x, scale).float() / scale).to(x.dtype)


class EmulatedFp8Linear(nn.Module):
    """A linear layer whose input (per row) and weight (per output row) are rounded through e4m3, as torchao's
    per-row float8 scheme does, computed in the layer's dtype."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.linear.weight
        w_scale = E4M3_MAX / w.detach().abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12)
        x_scale = E4M3_MAX / x.detach().abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-12)
        return F.linear(emulated(x, x_scale), emulated(w, w_scale), self.linear.bias)


def quantize_linears(model: nn.Module, kernel: str = "native") -> int:
    """Run the blocks' linear layers in fp8; returns how many. Call after fuse_qkv_projections(), before compiling."""
    names = [name for name, module in model.named_modules() if is_block_linear(module, name)]
    if kernel == "emulate":
        for name in names:
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent)
            setattr(owner, child, EmulatedFp8Linear(getattr(owner, child)))
        return len(names)
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    wanted = set(names)
    quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
              filter_fn=lambda module, name: name in wanted)
    return len(names)


# ---- fp8 self-attention ------------------------------------------------------------------------------------------

_GRAPHS: dict = {}  # (shape, stride, device index) -> built graph, its tensors and workspace
_HANDLES: dict = {}  # device index -> cuDNN handle


def _cudnn_graph(shape: tuple[int, ...], stride: tuple[int, ...], device: torch.device, handle):
    """The cuDNN fp8 SDPA graph for q/k/v/o of `shape` [B, H, S, D] with `stride` (built once per shape)."""
    import cudnn

    key = (shape, stride, device.index)
    if key in _GRAPHS:
        return _GRAPHS[key]
    e4m3, fp32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
    graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=fp32, compute_data_type=fp32, handle=handle)
    q, k, v = (graph.tensor(name=n, dim=list(shape), stride=list(stride), data_type=e4m3) for n in "qkv")
    scalars = {n: graph.tensor(name=n, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=fp32)
               for n in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")}
    o, _, amax_s, amax_o = graph.sdpa_fp8(q=q, k=k, v=v, **scalars, is_inference=True,
                                          attn_scale=1.0 / math.sqrt(shape[-1]), use_causal_mask=False, name="sdpa")
    o.set_output(True).set_dim(list(shape)).set_stride(list(stride)).set_data_type(e4m3)  # Hopper: fp8 output only
    for amax in (amax_s, amax_o):
        amax.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(fp32)
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    workspace = torch.empty(graph.get_workspace_size(), dtype=torch.uint8, device=device)
    _GRAPHS[key] = (graph, (q, k, v, o, amax_s, amax_o), scalars, workspace)
    return _GRAPHS[key]


@torch.library.custom_op("avatarcli::cudnn_fp8_attention", mutates_args=())
def cudnn_fp8_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Non-causal attention of [B, S, H, D] bf16 tensors in fp8 (per-tensor scales); returns [B, S, H, D] bf16."""
    import cudnn

    handle = _HANDLES.get(query.device.index)
    if handle is None:
        handle = _HANDLES[query.device.index] = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(query.device).cuda_stream)
    scales = [tensor_scale(t) for t in (query, key, value)]
    q8, k8, v8 = (to_e4m3(t, s) for t, s in zip((query, key, value), scales))
    b, s, h, d = q8.shape
    shape, stride = (b, h, s, d), (s * h * d, d, h * d, 1)  # BSHD memory viewed as [B, H, S, D]
    graph, (tq, tk, tv, to, tamax_s, tamax_o), scalars, workspace = _cudnn_graph(shape, stride, query.device, handle)
    out8 = torch.empty_like(q8)
    scale_o = scales[2]  # |o| <= max|v|: o * (448 / max|v|) stays in range
    one = torch.ones((), device=query.device)
    values = {"descale_q": 1 / scales[0], "descale_k": 1 / scales[1], "descale_v": 1 / scales[2],
              "descale_s": one / E4M3_MAX, "scale_s": one * E4M3_MAX, "scale_o": scale_o}
    amax_s = torch.empty(1, 1, 1, 1, device=query.device)
    amax_o = torch.empty(1, 1, 1, 1, device=query.device)
    pack = {tq: q8, tk: k8, tv: v8, to: out8, tamax_s: amax_s, tamax_o: amax_o}
    pack.update({scalars[n]: t.reshape(1, 1, 1, 1).float().contiguous() for n, t in values.items()})
    graph.execute(pack, workspace, handle=handle)
    return (out8.float() / scale_o).to(query.dtype)


@cudnn_fp8_attention.register_fake
def _(query, key, value):
    return torch.empty_like(query)


def emulated_fp8_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The same per-tensor e4m3 rounding of q, k, v, then exact attention (the probabilities are not rounded)."""
    q, k, v = (emulated(t, tensor_scale(t)).transpose(1, 2) for t in (query, key, value))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)


def smooth_kv(key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, S, H, D] key and value less their means over the tokens (dim 1), and value's mean [B, 1, H, D]."""
    value_mean = value.mean(dim=1, keepdim=True)
    return key - key.mean(dim=1, keepdim=True), value - value_mean, value_mean


def smoothed_attention(attend, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`attend` ([B, S, H, D] -> [B, S, H, D]) on smoothed key and value, value's mean added back: the same
    attention in exact arithmetic."""
    key, value, value_mean = smooth_kv(key, value)
    return attend(query, key, value) + value_mean


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved rotary embedding (pairs (0, 1), (2, 3), ... rotated), computed as diffusers does."""
    even, odd = x[..., 0::2], x[..., 1::2]
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([even * c - odd * s, even * s + odd * c], dim=-1).flatten(-2).type_as(x)


class Fp8SelfAttnProcessor:
    """Self-attention of a Wan block (diffusers' WanAttnProcessor without an encoder context) with fp8 attention;
    `smooth`: k and v smoothed before they are quantized (`smoothed_attention`)."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, kernel: str = "native", smooth: bool = True) -> None:
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        self.attend = cudnn_fp8_attention if kernel == "native" else emulated_fp8_attention
        self.smooth = smooth

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None,
                 rotary_emb=None) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("the fp8 processor is for the blocks' unmasked self-attention")
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        heads = attn.heads
        query = attn.norm_q(query).unflatten(2, (heads, -1))
        key = attn.norm_k(key).unflatten(2, (heads, -1))
        value = value.unflatten(2, (heads, -1))
        if rotary_emb is not None:
            query, key = apply_rotary(query, *rotary_emb), apply_rotary(key, *rotary_emb)
        query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
        out = smoothed_attention(self.attend, query, key, value) if self.smooth else self.attend(query, key, value)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def use_fp8(model: nn.Module, *, linear: bool = True, attention: bool = True, kernel: str = "native",
            smooth: bool = True) -> dict:
    """Switch a Wan-based DiT (ours or stock diffusers') to fp8 in place; returns what was changed. `smooth`: the
    self-attention's k and v smoothed before quantizing (see the module docstring)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    done = {"linear_layers": 0, "attention_layers": 0}
    if attention:
        for block in model.blocks:
            block.attn1.set_processor(Fp8SelfAttnProcessor(kernel, smooth))
            done["attention_layers"] += 1
    if linear:
        done["linear_layers"] = quantize_linears(model, kernel)
    return done
