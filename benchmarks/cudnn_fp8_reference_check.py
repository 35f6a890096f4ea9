"""Which model of cuDNN's FP8 attention its output matches: ``diffquant::cudnn_fp8_sdpa`` on the GPU against
candidate references on random e4m3 inputs. Candidates: P rounded to e4m3 against the row's global max ("global")
or online over blocks of 64, 128 or 256 keys against the running max ("online<N>"), the row sum taken from the
rounded P ("qsum") or from P before rounding ("fsum"). Per shape (B, H, Sq, D, Sk), the relative L2 distance of
each candidate's e4m3 output from cuDNN's. :func:`diffquant.kernels.cudnn_attention.cudnn_fp8_sdpa_reference` is
the winner ("online256_fsum", session 14, 2026-11-29). Needs a GPU of compute capability 9.0+ and the
``nvidia-cudnn-frontend`` wheel (``scripts/gpu/cudnn_fp8_attention.sh`` shows how it is installed).

    python benchmarks/cudnn_fp8_reference_check.py [--out benchmarks/results/cudnn_fp8_reference_check.json]
"""
from __future__ import annotations

import argparse
import json

SHAPES = [(2, 8, 4096, 40, 4096), (2, 8, 1024, 80, 77), (1, 8, 64, 160, 64), (2, 8, 1024, 80, 1024)]
E4M3_MAX = 448.0


def candidates(q8, k8, v8, sm_scale: float, scale_o: float) -> dict:
    """Every candidate model's e4m3 output (as float) for e4m3 q8, k8, v8 (descales 1)."""
    import torch

    def rnd(x):
        return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()

    s = (q8.float() @ k8.float().transpose(-1, -2)) * sm_scale
    v = v8.float()
    out = {}
    p = torch.exp(s - s.amax(-1, keepdim=True))
    p8 = rnd(p * E4M3_MAX)
    out["global_qsum"] = (p8 @ v) / p8.sum(-1, keepdim=True)
    out["global_fsum"] = (p8 @ v) / (p * E4M3_MAX).sum(-1, keepdim=True)
    for bn in (64, 128, 256):
        for fsum in (False, True):
            m = torch.full((*s.shape[:-1], 1), -float("inf"), device=s.device)
            row_sum = torch.zeros_like(m)
            acc = torch.zeros((*s.shape[:-1], v.shape[-1]), device=s.device)
            for j in range(0, s.shape[-1], bn):
                sj = s[..., j:j + bn]
                m_new = torch.maximum(m, sj.amax(-1, keepdim=True))
                alpha = torch.exp(m - m_new)
                pj = torch.exp(sj - m_new) * E4M3_MAX
                pj8 = rnd(pj)
                acc = acc * alpha + pj8 @ v[..., j:j + bn, :]
                row_sum = row_sum * alpha + (pj.sum(-1, keepdim=True) if fsum else pj8.sum(-1, keepdim=True))
                m = m_new
            out[f"online{bn}_{'fsum' if fsum else 'qsum'}"] = acc / row_sum
    return {k: rnd(o * scale_o) for k, o in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/cudnn_fp8_reference_check.json")
    a = ap.parse_args()
    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        raise SystemExit("cudnn_fp8_reference_check.py needs a CUDA GPU")
    from diffquant.kernels import cudnn_attention as ca
    from diffquant.kernels import ops
    from diffquant.kernels.bench import write_gpu_result

    why = ca.unavailable(torch.device("cuda"))
    if why is not None:
        raise SystemExit(f"cudnn_fp8_reference_check.py: {why}")
    rows = []
    for b, h, sq, d, sk in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(b, h, sq, d, device="cuda", generator=g, dtype=torch.bfloat16)
        k, v = (torch.randn(b, h, sk, d, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
        dp = ca.padded_head_dim(d)
        q8, k8, v8 = (F.pad(t, (0, dp - d)).to(torch.float8_e4m3fn) for t in (q, k, v))
        one = torch.ones(1, device="cuda")
        got = ops.cudnn_fp8_sdpa(q8, k8, v8, one, one, one, one * 100, d ** -0.5).float()
        row = {"shape": [b, h, sq, d, sk]}
        for name, want in candidates(q8, k8, v8, d ** -0.5, 100.0).items():
            row[name] = round(float((got - want).norm() / want.norm()), 5)
        rows.append(row)
        print(json.dumps(row), flush=True)
    write_gpu_result(a.out, rows)


if __name__ == "__main__":
    main()
