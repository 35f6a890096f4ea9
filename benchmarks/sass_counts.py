"""SASS instruction counts of the GEGLU, group-norm and 4-D TMA conv kernels for Hopper, without a GPU: each kernel is compiled by
Triton for sm_90 (integer arguments and pointers marked 16-divisible, as Triton specializes them at a real launch),
assembled by Triton's bundled ptxas and disassembled by its nvdisasm. Per kernel: all instructions, those of the
pixel loop (norm kernels: from the loop's label to its back-branch), and the most frequent opcodes. The epilogues of
these kernels are limited by instruction issue on the H200 (Nsight Compute, ``benchmarks/results/ncu_probe.txt``), so
the counts are what the session-17 changes were steered by. The conv rows (session 18) count the wgmmas that take
A from registers against those that read it from shared memory, for A boxes of two output rows and of one.

    python benchmarks/sass_counts.py [--out benchmarks/results/sass_counts.json]

Needs Triton (any machine); the counts depend on the Triton version (recorded). Triton 3.9 emits PTX that only its
``ptxas-blackwell`` reads; the script takes whichever of the two accepts the PTX.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import tempfile
import time

_OP = re.compile(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P[0-9T]\s+)?([A-Z0-9_]+)")


def _build(fn, consts: dict, types, warps: int, stages: int, divisible=()):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    consts = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}, **consts}
    consts = {k: v for k, v in consts.items() if k in fn.arg_names}
    sig = {n: "constexpr" if n in consts else types(n) for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if n not in consts and (n.endswith("_ptr") or n in divisible)}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})


def _sass(ptx: str) -> str:
    import triton

    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as d:
        with open(f"{d}/k.ptx", "w") as f:
            f.write(ptx)
        err = ""
        for exe in ("ptxas", "ptxas-blackwell"):
            path = os.path.join(bindir, exe)
            if not os.path.exists(path):
                continue
            r = subprocess.run([path, "-arch=sm_90a", f"{d}/k.ptx", "-o", f"{d}/k.cubin"], capture_output=True,
                               text=True)
            if r.returncode == 0:
                return subprocess.run([os.path.join(bindir, "nvdisasm"), "-c", f"{d}/k.cubin"], capture_output=True,
                                      text=True, check=True).stdout
            err = r.stderr.strip()[-300:]
    raise RuntimeError(f"no bundled ptxas assembled the PTX: {err}")


def _count(lines) -> collections.Counter:
    ops = collections.Counter()
    for line in lines:
        m = _OP.match(line)
        if m:
            ops[m.group(1)] += 1
    return ops


def _row(name: str, kernel, sass: str, loop: bool) -> dict:
    lines = sass.splitlines()
    ops = _count(lines)
    row = {"kernel": name, "triton_kernel": kernel, "instructions": sum(ops.values()),
           "top": ops.most_common(12)}
    if loop:  # the pixel loop: the first back-branch and the label it jumps to
        for i, line in enumerate(lines):
            m = re.search(r"BRA `\((\.L_x_\d+)\)", line)
            if m:
                start = next((j for j, ln in enumerate(lines) if ln.startswith(m.group(1) + ":")), None)
                if start is not None and start < i:
                    lops = _count(lines[start:i + 1])
                    row["loop_instructions"] = sum(lops.values())
                    row["loop_top"] = lops.most_common(10)
                    break
    print(json.dumps({k: v for k, v in row.items() if not k.endswith("top")}), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/sass_counts.json")
    a = ap.parse_args()
    import triton

    from diffquant.kernels import triton_geglu as tg
    from diffquant.kernels import triton_norm as tn

    rows = []
    bm, bn, bk = 128, 64, 128

    def gt(n):
        if n == "a_desc":
            return f"tensordesc<fp8e4nv[{bm}, {bk}]>"
        if n == "w_desc":
            return f"tensordesc<fp8e4nv[{bn}, {bk}]>"
        if n == "out_desc":
            return f"tensordesc<u8[{bm}, {bn}]>"
        return "*u8" if n == "out_ptr" else "*fp32" if n.endswith("_ptr") else "i32"

    base = dict(HAS_BIAS=True, QUANT=True, OSCALE_PER_CH=False, BITCAST_FP8=False, EMULATE=False, BLOCK_M=bm,
                BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8)
    for name, over in (("linear_geglu, per-element stores, libdevice erf", dict(TMA_OUT=False, POLY=False)),
                       ("linear_geglu, TMA store, libdevice erf", dict(TMA_OUT=True, POLY=False)),
                       ("linear_geglu, TMA store, polynomial erf (default)", dict(TMA_OUT=True, POLY=True))):
        k = _build(tg._linear_geglu_kernel, dict(base, **over), gt, 4, 2)
        rows.append(_row(f"{name} ({bm}x{bn}x{bk}, 4 warps, 2 stages)", "_linear_geglu_kernel", _sass(k.asm["ptx"]),
                         False))

    def nt(n):
        if n in ("x_ptr", "x2_ptr", "add_ptr", "raw_ptr", "rso_ptr", "rzp_ptr", "zp_ptr", "w_ptr", "b_ptr"):
            return "*bf16"
        if n == "out_ptr":
            return "*u8"
        if n.endswith("_ptr"):
            return "*fp32"
        return "fp32" if n in ("eps", "inv_total") else "i32"

    norm = dict(HAS_X2=False, HAS_ADD=True, SILU=True, QUANT=True, INT8=False, SCALE_PER_CH=False, RAW=False,
                RAW_INT8=False, RAW_PER_CH=False, EMULATE=False, PURE=False, BLOCK_P=64, BLOCK_C=64, LOAD_STAGES=1,
                FOLD=False)
    for fn in (tn._gn_stats_kernel, tn._gn_apply_kernel):
        k = _build(fn, norm, nt, 4, 1, divisible=("HW", "C1", "C", "SEG_P"))
        rows.append(_row(f"{fn.__name__} (64 pixels x 64 channels a step, time-embedding add, SiLU, e4m3 out, "
                         "4 warps)", fn.__name__, _sass(k.asm["ptx"]), True))
    # the 4-D TMA conv kernel (wide tiles, 128 + 32 output channels, 4 warps, 3 stages): A boxes of one output row
    # against boxes of two. Triton cannot reshape a shared-memory operand, so a multi-row box goes through registers:
    # every wgmma then takes A from registers and is waited on at once (WARPGROUP.DEPBAR.LE gsb0, 0x0)
    from diffquant.kernels import triton_conv_tma as tt

    for bi, bh, bw in ((1, 2, 64), (1, 1, 128)):
        def ct(n, bi=bi, bh=bh, bw=bw):
            if n == "a_desc":
                return f"tensordesc<fp8e4nv[{bi}, {bh}, {bw}, 128]>"
            if n == "b2_desc":
                return "tensordesc<fp8e4nv[32, 128]>"
            if n == "b_desc":
                return "tensordesc<fp8e4nv[128, 128]>"
            return "*bf16" if n in ("out_ptr", "add_ptr") else "*fp32" if n.endswith("_ptr") else "i32"

        consts = dict(KH=3, KW=3, A_INT=False, BITCAST_FP8=False, PAD_FIX=False, HAS_ASCALE=True, HAS_CORR=False,
                      HAS_BIAS=True, HAS_ADD=False, soc=1, sac=1, BI=bi, BH=bh, BW=bw, BLOCK_N=128, BLOCK_N2=32,
                      BLOCK_K=128, GROUP_M=8, FP8_ACC=None)
        k = _build(tt._qconv_tma4d_wide_kernel, consts, ct, 4, 3, divisible=("Cout", "CK", "son", "soh", "sow"))
        sass = _sass(k.asm["ptx"])
        row = _row(f"_qconv_tma4d_wide_kernel (A boxes of {bi} x {bh} x {bw} pixels x 128 channels, 128 + 32 output "
                   "channels, 4 warps, 3 stages)", "_qconv_tma4d_wide_kernel", sass, True)
        row["qgmma_register_a"] = len(re.findall(r"QGMMA\.\S+ R\d+, R\d+", sass))
        row["qgmma_shared_a"] = len(re.findall(r"QGMMA\.\S+ R\d+, gdesc", sass))
        row["wgmma_wait_all"] = sass.count("WARPGROUP.DEPBAR.LE gsb0, 0x0")
        print(json.dumps({k_: row[k_] for k_ in ("qgmma_register_a", "qgmma_shared_a", "wgmma_wait_all")}), flush=True)
        rows.append(row)
    res = {"command": "python benchmarks/sass_counts.py", "date": time.strftime("%Y-%m-%d"),
           "triton": triton.__version__, "target": "sm_90a", "rows": rows}
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print("wrote", a.out)


if __name__ == "__main__":
    main()
