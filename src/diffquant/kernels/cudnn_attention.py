"""FP8 attention through cuDNN's fused kernel: cudnn-frontend's ``sdpa_fp8`` graph (e4m3 Q, K, V and output,
per-tensor scales), for ``diffquant::cudnn_fp8_sdpa`` and ``fp8_attention(..., backend="cudnn")``
(``DIFFQUANT_FP8_ATTN_BACKEND=cudnn``).

Why: attention is 3.55 of SD-1.5 b8's 15.2 busy ms (H200, 2026-11-28/29), in cuDNN's bf16 kernel, and diffquant's
Triton FP8 kernel is 2x slower than that (BENCHMARKS.md, ninth measurement). cuDNN's own FP8 kernel needs no new
kernel. It takes head dims that are multiples of 16, so SD-1.5's 40 runs zero-padded to 48 (the Triton kernel pads
to 64). Written in session 13 (the graph validates and lowers on the CPU); first run on an H200 in session 14
(2026-11-29): its GPU tests pass and it is timed, below.

The semantics (:func:`cudnn_fp8_sdpa_reference`, the CPU path and test oracle): S = Q8·K8ᵀ x descale_q descale_k
x sm_scale; an online softmax over blocks of 256 keys: per block, P = exp(S - running row max) x 448 (cuDNN's
``scale_s``) rounded to e4m3 for the P·V8 product, the row sum taken from P before that rounding, the running sums
rescaled when the max grows; O = sum / row sum x descale_v; e4m3 of O x ``scale_o``. Measured on an H200 (cuDNN
9.19, cudnn-frontend 1.32, 2026-11-29, session 14's probe): this model is 1.3-1.5 % (relative L2 of the e4m3
outputs) from cuDNN at 1,024 and 4,096 keys and 0.8-0.9 % at 64 and 77. A global row max (every key in one block) is
3.4-3.7 % away at 1,024-4,096 keys, blocks of 64 or 128 keys 2.2-2.9 %, and a row sum of the rounded P 1.8 % at 77
keys, so neither is what cuDNN computes.

Measured speed (``bash scripts/gpu/cudnn_fp8_attention.sh``, H200, 2026-11-29): **no faster than cuDNN's bf16
attention** on SD-1.5 b8's shapes: the 64x64 self-attention (4,096 keys, head dim 40 run as 48) 0.617 against
0.602 ms, 32x32 self 0.0623 against 0.0629, the cross-attentions and smaller levels 0.58-0.95x; per UNet call 4.13
against 3.81 ms, and 5.97 ms with the quantize and pad around it (compiled). At head dim 40 the softmax's
exponentials, not the matmuls, bound attention, and FP8 does not make them cheaper. So the backend is opt-in.

Needs the ``nvidia-cudnn-frontend`` package (``import cudnn``) and a GPU of compute capability 9.0 or newer.
"""
from __future__ import annotations

from typing import Optional

import torch

E4M3_MAX = 448.0
# keys per online-softmax block in the reference: the block size whose rounding of P matched cuDNN best (module
# docstring; 64, 128 and 256 tried)
REFERENCE_BLOCK_KEYS = 256
_GRAPHS: dict = {}
_HANDLES: dict = {}


def padded_head_dim(d: int) -> int:
    """The head dim cuDNN's FP8 attention runs ``d`` at: the next multiple of 16."""
    return -(-int(d) // 16) * 16


def unavailable(device: torch.device) -> Optional[str]:
    """Why cuDNN's FP8 attention cannot run on ``device`` (None: it can)."""
    if device.type != "cuda":
        return "not a CUDA tensor"
    if torch.cuda.get_device_capability(device)[0] < 9:
        return "cuDNN's FP8 attention needs compute capability 9.0+"
    try:
        import cudnn  # noqa: F401
    except ImportError as e:
        return f"no cudnn-frontend package ({e})"
    return None


def _to_e4m3(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def cudnn_fp8_sdpa_reference(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, descale_q: torch.Tensor,
                             descale_k: torch.Tensor, descale_v: torch.Tensor, scale_o: torch.Tensor,
                             sm_scale: float, block_keys: int = REFERENCE_BLOCK_KEYS) -> torch.Tensor:
    """What ``diffquant::cudnn_fp8_sdpa`` computes (module docstring: an online softmax over ``block_keys`` keys at a
    time, P rounded to e4m3 for P·V, the row sum from P unrounded), in float32; e4m3 [B, H, Sq, D] out."""
    if block_keys < 1:
        raise ValueError(f"block_keys must be positive; got {block_keys}")
    s = (q8.float() @ k8.float().transpose(-1, -2)) * (descale_q.float() * descale_k.float() * sm_scale).reshape(())
    v = v8.float()
    shape = (*s.shape[:-1], 1)
    m = torch.full(shape, -float("inf"), device=s.device)
    row_sum = torch.zeros(shape, device=s.device)
    acc = torch.zeros((*s.shape[:-1], v.shape[-1]), device=s.device)
    for j in range(0, s.shape[-1], block_keys):
        sj = s[..., j:j + block_keys]
        m_new = torch.maximum(m, sj.amax(dim=-1, keepdim=True))
        alpha = torch.exp(m - m_new)  # exp(-inf) = 0 on the first block
        p = torch.exp(sj - m_new) * E4M3_MAX
        acc = acc * alpha + _to_e4m3(p).float() @ v[..., j:j + block_keys, :]
        row_sum = row_sum * alpha + p.sum(dim=-1, keepdim=True)
        m = m_new
    o = acc / row_sum * descale_v.float().reshape(())
    return _to_e4m3(o * scale_o.float().reshape(())).contiguous()


def _handle(device: torch.device):
    import cudnn

    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _HANDLES:
        with torch.cuda.device(idx):
            _HANDLES[idx] = cudnn.create_handle()
    return _HANDLES[idx]


def _graph(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, o8: torch.Tensor, sm_scale: float):
    """The built graph (and its tensors and workspace) for these shapes and strides, cached."""
    import cudnn

    key = (q8.device, *(tuple(t.shape) + tuple(t.stride()) for t in (q8, k8, v8, o8)), float(sm_scale))
    if key in _GRAPHS:
        return _GRAPHS[key]
    e4m3, fp32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
    g = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=fp32, compute_data_type=fp32,
                      handle=_handle(q8.device))
    tq, tk, tv = (g.tensor(name=n, dim=list(t.shape), stride=list(t.stride()), data_type=e4m3)
                  for n, t in (("q", q8), ("k", k8), ("v", v8)))
    names = ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")
    scalars = [g.tensor(name=n, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=fp32) for n in names]
    o, _, amax_s, amax_o = g.sdpa_fp8(q=tq, k=tk, v=tv, descale_q=scalars[0], descale_k=scalars[1],
                                      descale_v=scalars[2], descale_s=scalars[3], scale_s=scalars[4],
                                      scale_o=scalars[5], generate_stats=False, attn_scale=float(sm_scale),
                                      use_causal_mask=False)
    o.set_output(True).set_dim(list(o8.shape)).set_stride(list(o8.stride())).set_data_type(e4m3)
    for amax in (amax_s, amax_o):
        amax.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(fp32)
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support()
    g.build_plans()
    tensors = dict(zip(("q", "k", "v", "o", "amax_s", "amax_o"), (tq, tk, tv, o, amax_s, amax_o)))
    tensors.update(zip(names, scalars))
    one = torch.ones(1, 1, 1, 1, device=q8.device)
    entry = (g, tensors, torch.empty(max(1, g.get_workspace_size()), dtype=torch.uint8, device=q8.device),
             dict(descale_s=one / E4M3_MAX, scale_s=one * E4M3_MAX, amax_s=torch.empty_like(one),
                  amax_o=torch.empty_like(one)))
    _GRAPHS[key] = entry
    return entry


def cudnn_fp8_sdpa_cuda(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, descale_q: torch.Tensor,
                        descale_k: torch.Tensor, descale_v: torch.Tensor, scale_o: torch.Tensor,
                        sm_scale: float) -> torch.Tensor:
    """``diffquant::cudnn_fp8_sdpa`` on the GPU: the cached graph run on the current stream (so a CUDA graph can
    capture it: the workspace and the constant scales are allocated once, with the graph)."""
    import cudnn

    o8 = torch.empty(q8.shape, dtype=torch.float8_e4m3fn, device=q8.device)
    g, tensors, workspace, consts = _graph(q8, k8, v8, o8, sm_scale)
    handle = _handle(q8.device)
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(q8.device).cuda_stream)
    as4 = lambda t: t.float().reshape(1, 1, 1, 1).contiguous()  # noqa: E731
    values = dict(q=q8, k=k8, v=v8, o=o8, descale_q=as4(descale_q), descale_k=as4(descale_k),
                  descale_v=as4(descale_v), scale_o=as4(scale_o), **consts)
    g.execute({tensors[k]: v for k, v in values.items()}, workspace, handle=handle)
    return o8
