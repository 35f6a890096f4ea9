"""What the compiler makes of the conv, GEGLU and FP8 attention kernels for Hopper, without a GPU: each kernel is
compiled by Triton for sm_90 and its PTX run through Triton's bundled ``ptxas -v``. Per kernel and block config: registers, spilled
bytes, and whether ptxas serializes the wgmma pipeline (its warning C7515: "wgmma.mma_async instructions are
serialized due to non wgmma instructions defining accumulator registers"). Also how the A tile reaches the tensor
cores: from shared memory, or loaded into registers first (``ttg.local_load`` in the TTGIR: the 4-D TMA kernels'
``tl.reshape`` of the box).

    python benchmarks/ptxas_report.py [--out benchmarks/results/ptxas_report.json]
    python benchmarks/ptxas_report.py --table-census [--out benchmarks/results/ptxas_table_census.json]

``--table-census``: instead, every FP8 conv entry that the packaged H200 table ships for the given batch sizes
(``--batches``, default 8: the SD-1.5 UNet's), compiled as the model runs it (its kernel, config, 4-D box and residual
add or not). ``DIFFQUANT_KLOOP_HINT=0`` compiles the K loops without the never-empty hint.

Needs Triton (any machine); the numbers depend on the Triton version (recorded).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def _build(fn, consts: dict, types, warps: int, stages: int, divisible=()):
    """``divisible``: arguments marked 16-divisible (tt.divisibility), as Triton specializes them at a launch."""
    consts = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}, **consts}
    sig = {n: "constexpr" if n in consts else types(n) for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n in divisible}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})


def _ptxas(ptx: str) -> dict:
    exe = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    r = subprocess.run([exe, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True, text=True)
    os.unlink(f.name)
    out = r.stdout + r.stderr
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores", out)
    return {"registers": int(regs.group(1)) if regs else None, "spill_store_bytes": int(spill.group(1)) if spill else None,
            "wgmma_serialized": "C7515" in out}


def _conv_types(el: str, a_box: str, b_box: str):
    def t(n):
        if n == "a_desc":
            return f"tensordesc<{el}[{a_box}]>"
        if n == "b_desc":
            return f"tensordesc<{el}[{b_box}]>"
        if n in ("out_ptr", "add_ptr"):
            return "*bf16"
        if n in ("ascale_ptr", "wscale_ptr", "bias_ptr"):
            return "*fp32"
        return "*i32" if n.endswith("_ptr") else "i32"
    return t


def _conv_row(name: str, fn, consts: dict, el: str, a_box: str, kind: str, config: tuple) -> dict:
    """One conv kernel's row: compiled for sm_90 with the given constexprs and A box, read by ptxas (printed)."""
    bm, bn, bk, warps, stages = config
    k = _build(fn, consts, _conv_types(el, a_box, f"{bn}, {bk}"), warps, stages)
    row = {"kernel": name, "act": kind, "config": list(config), "a_via_registers": "ttg.local_load" in k.asm["ttgir"]}
    row.update(_ptxas(k.asm["ptx"]))
    print(json.dumps(row), flush=True)
    return row


def _census_row(key: str, cfg: dict) -> dict:
    """One shipped table entry (``fp8:NxCxHxW:o<cout>:k<kh>x<kw>:s..:p..:d..:<dtype>[:add]``) compiled as the model runs
    it: the kernel its path and config pick, the 4-D box of its output size, with or without the residual add."""
    from diffquant.kernels import triton_conv as tc
    from diffquant.kernels import triton_conv_tma as tt
    from diffquant.kernels.reference import conv_out_hw

    parts = key.split(":")
    _, c, h, w = (int(v) for v in parts[1].split("x"))
    kh, kw = (int(v) for v in parts[3][1:].split("x"))
    stride, pad = ([int(v) for v in parts[i][1:].split("x")] for i in (4, 5))
    add = parts[-1] == "add"
    ho, wo = conv_out_hw(h, w, kh, kw, stride, pad, (1, 1))
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    path, split, bn2 = cfg.get("path", "gather"), cfg.get("SPLIT_K", 1), cfg.get("BLOCK_N2", 0)
    bi, bh, bw = tt.tile_4d(bm, ho, wo)
    boxes = {"b_desc": f"{bn}, {bk}", "b2_desc": f"{bn2}, {bk}"}
    consts = dict(KH=kh, KW=kw, A_INT=False, A_FP8=True, W4=False, HAS_AZP=False, HAS_WZP=False, BITCAST_FP8=False,
                  PAD_FIX=False, HAS_ASCALE=True, HAS_CORR=False, HAS_BIAS=True, HAS_ADD=add, BLOCK_M=bm, BLOCK_N=bn,
                  BLOCK_N2=bn2, BLOCK_K=bk, GROUP_M=8, BI=bi, BH=bh, BW=bw, FLATTEN=True,
                  EVEN_K=c % bk == 0)
    if path == "gather":
        fn = tc._qconv_kernel
    elif path == "tma":
        fn = tt._qconv_tma_splitk_kernel if split > 1 else tt._qconv_tma_kernel
        boxes["a_desc"] = f"{bm}, {bk}"
    else:
        fn = {"tma4dp": tt._qconv_tma4d_persistent_kernel, "tma4dr": tt._qconv_tma4d_rows_kernel}.get(path)
        fn = fn or (tt._qconv_tma4d_splitk_kernel if split > 1 else tt._qconv_tma4d_wide_kernel if bn2
                    else tt._qconv_tma4d_kernel)
        boxes["a_desc"] = f"1, 1, {bw}, {bk}" if path == "tma4dr" else f"{bi}, {bh}, {bw}, {bk}"
    # as a real launch specializes them: unit channel strides constant, pointers and the other channel counts and
    # strides (multiples of 16 at SD-1.5's widths) 16-divisible
    consts.update(soc=1, sac=1, sxc=1)
    consts = {k: v for k, v in consts.items() if k in fn.arg_names}
    divisible = ("Cout", "CK", "son", "soh", "sow", "san", "sah", "saw", "sxn", "sxh", "sxw", "swn")

    def types(n):
        if n.endswith("_desc"):
            return f"tensordesc<fp8e4nv[{boxes[n]}]>"
        if n in ("x_ptr", "w_ptr"):  # the gather kernel reads FP8 as its bytes and bitcasts
            return "*u8"
        if n in ("out_ptr", "add_ptr"):
            return "*bf16"
        return "*fp32" if n.endswith("_ptr") else "i32"

    k = _build(fn, consts, types, cfg["num_warps"], cfg["num_stages"],
               divisible=[n for n in fn.arg_names if n not in consts and (n.endswith("_ptr") or n in divisible)])
    row = {"key": key, "kernel": fn.__name__, "config": cfg, "box": [bi, bh, bw], "residual_add": add,
           "a_via_registers": "ttg.local_load" in k.asm["ttgir"]}
    row.update(_ptxas(k.asm["ptx"]))
    print(json.dumps({k_: v for k_, v in row.items() if k_ != "config"}), flush=True)
    return row


def table_census(out: str, batches: tuple = ("8",)) -> None:
    """:func:`_census_row` for every FP8 conv entry of the packaged H200 table at these batch sizes (default SD-1.5
    b8's; the ``qconv_sc`` entries are left out: their kernels are in the report's other section)."""
    from diffquant.kernels import tuning

    table = [t for t in tuning.packaged_tables() if t["device"] == "NVIDIA H200"][0]
    rows, seen = [], {}
    for key, cfg in sorted(table["configs"].items()):
        parts = key.split(":")
        if parts[0] != "fp8" or parts[1].split("x")[0] not in batches or ":sc" in key:
            continue
        _, c, h, w = parts[1].split("x")
        # entries that compile to the same kernel (config, box, residual) are compiled once
        sig = (json.dumps(cfg, sort_keys=True), c, h, w, parts[3], parts[4], parts[5], parts[-1] == "add")
        if sig not in seen:
            seen[sig] = _census_row(key, cfg)
        rows.append(dict(seen[sig], key=key))
    with open(out, "w") as f:
        json.dump({"command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d"),
                   "triton": triton.__version__, "target": "sm_90a (compiled without a GPU)",
                   "kloop_hint": os.environ.get("DIFFQUANT_KLOOP_HINT", "1"),
                   "serialized": sum(r["wgmma_serialized"] for r in rows), "entries": len(rows), "rows": rows}, f,
                  indent=1)
    print(f"{sum(r['wgmma_serialized'] for r in rows)} of {len(rows)} entries serialize the wgmma pipeline; wrote {out}")


def main() -> None:
    from diffquant.kernels import triton_conv_tma as tt
    from diffquant.kernels import triton_geglu as tg

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="default: benchmarks/results/ptxas_report.json, or "
                    "ptxas_table_census.json with --table-census")
    ap.add_argument("--table-census", action="store_true",
                    help="compile the shipped H200 table's FP8 conv entries as the model runs them")
    ap.add_argument("--batches", default="8", help="with --table-census: the batch sizes (comma list; default 8)")
    a = ap.parse_args()
    if a.table_census:
        table_census(a.out or "benchmarks/results/ptxas_table_census.json", tuple(a.batches.split(",")))
        return
    a.out = a.out or "benchmarks/results/ptxas_report.json"
    rows = []
    for kind in ("fp8", "int8"):
        fp8 = kind == "fp8"
        el = "fp8e4nv" if fp8 else "i8"
        for bm, bn, bk, warps, stages in ((128, 128, 128, 4, 3), (128, 128, 128, 8, 4), (128, 64, 128, 4, 4)):
            common = dict(KW=3, A_INT=not fp8, BITCAST_FP8=False, HAS_ASCALE=True, HAS_CORR=not fp8, HAS_BIAS=True,
                          HAS_ADD=True, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8)
            box4 = dict(KH=3, PAD_FIX=not fp8, BI=1, BH=bm // 32, BW=32)
            for name, fn, consts, a_box in (
                    ("tma (2-D, padded copy)", tt._qconv_tma_kernel, dict(common, BLOCK_M=bm), f"{bm}, {bk}"),
                    ("tma4d", tt._qconv_tma4d_kernel, dict(common, **box4), f"1, {bm // 32}, 32, {bk}"),
                    ("tma4dp (persistent)", tt._qconv_tma4d_persistent_kernel, dict(common, **box4, FLATTEN=True),
                     f"1, {bm // 32}, 32, {bk}")):
                rows.append(_conv_row(name, fn, consts, el, a_box, kind, (bm, bn, bk, warps, stages)))

    # 64-pixel output rows (SD-1.5's 64x64 level): tiles of 2 or 4 rows as one reshaped box (tma4d) against one
    # one-row box and one dot per row (tma4dr)
    for kind in ("fp8", "int8"):
        fp8 = kind == "fp8"
        el = "fp8e4nv" if fp8 else "i8"
        for bm, bn, bk, warps, stages in ((128, 128, 128, 4, 3), (128, 128, 128, 8, 4), (256, 128, 64, 8, 3),
                                          (128, 256, 128, 8, 3)):
            consts = dict(KW=3, KH=3, A_INT=not fp8, BITCAST_FP8=False, PAD_FIX=not fp8, HAS_ASCALE=True,
                          HAS_CORR=not fp8, HAS_BIAS=True, HAS_ADD=True, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, BI=1,
                          BH=bm // 64, BW=64)
            for name, fn, a_box in (("tma4d, 64-wide rows", tt._qconv_tma4d_kernel, f"1, {bm // 64}, 64, {bk}"),
                                    ("tma4dr (one dot per row), 64-wide rows", tt._qconv_tma4d_rows_kernel,
                                     f"1, 1, 64, {bk}")):
                rows.append(_conv_row(name, fn, consts, el, a_box, kind, (bm, bn, bk, warps, stages)))

    # split-K (SD-1.5's 8x8 level: tiles of two 8x8 images for the 4-D kernel, padded-copy rows for the 2-D one): the
    # split kernels have no epilogue (partials to an fp32 workspace)
    for bm, bn, bk, warps, stages in ((128, 128, 128, 8, 4), (64, 128, 128, 4, 4), (64, 128, 64, 4, 4)):
        split = dict(KW=3, A_INT=False, BITCAST_FP8=False, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8)
        full = dict(split, HAS_ASCALE=True, HAS_CORR=False, HAS_BIAS=True, HAS_ADD=True)
        box4 = dict(BI=bm // 64, BH=8, BW=8)
        for name, fn, consts, a_box in (
                ("tma (2-D, padded copy)", tt._qconv_tma_kernel, dict(full, BLOCK_M=bm), f"{bm}, {bk}"),
                ("tma split-K", tt._qconv_tma_splitk_kernel, dict(split, BLOCK_M=bm), f"{bm}, {bk}"),
                ("tma4d, 8x8 images", tt._qconv_tma4d_kernel, dict(full, KH=3, PAD_FIX=False, **box4),
                 f"{bm // 64}, 8, 8, {bk}"),
                ("tma4d split-K, 8x8 images", tt._qconv_tma4d_splitk_kernel, dict(split, **box4),
                 f"{bm // 64}, 8, 8, {bk}")):
            types = _conv_types("fp8e4nv", a_box, f"{bn}, {bk}")
            k = _build(fn, consts, lambda n, t=types: "*fp32" if n == "ws_ptr" else t(n), warps, stages)
            row = {"kernel": name, "act": "fp8", "config": [bm, bn, bk, warps, stages],
                   "a_via_registers": "ttg.local_load" in k.asm["ttgir"]}
            row.update(_ptxas(k.asm["ptx"]))
            rows.append(row)
            print(json.dumps(row), flush=True)

    # conv2 with its two-part 1x1 shortcut in one accumulator (diffquant::qconv_sc), SD-1.5's 64x64 level (two rows of
    # 64 a tile), plain and with wide tiles (128 + 32 or 256 + 64 output channels), beside the plain 4-D kernel with
    # a residual above
    for bn, bn2, bk, warps, stages in ((128, 0, 128, 4, 3), (128, 32, 128, 4, 3), (256, 64, 64, 8, 4)):
        def sct(n, bn=bn, bn2=bn2, bk=bk):
            if n in ("a_desc", "a1_desc", "a2_desc"):
                return f"tensordesc<fp8e4nv[1, 2, 64, {bk}]>"
            if n in ("b_desc", "b1_desc", "b2_desc"):
                return f"tensordesc<fp8e4nv[{bn}, {bk}]>"
            if n in ("bw_desc", "b1w_desc", "b2w_desc"):
                return f"tensordesc<fp8e4nv[{bn2}, {bk}]>"
            return "*bf16" if n == "out_ptr" else "*fp32" if n.endswith("_ptr") else "i32"

        consts = dict(KW=3, KSC=1, BITCAST_FP8=False, HAS_BIAS=True, HAS_SC_BIAS=True, NSC=2, BI=1, BH=2, BW=64,
                      BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8)
        fn = tt._qconv_tma4d_sc_wide_kernel if bn2 else tt._qconv_tma4d_sc_kernel
        k = _build(fn, dict(consts, BLOCK_N2=bn2) if bn2 else consts, sct, warps, stages)
        row = {"kernel": "qconv_sc (conv2 + two-part 1x1 shortcut), 64-wide rows" + (f", wide +{bn2}" if bn2 else ""),
               "act": "fp8", "config": [128, bn, bk, warps, stages], "a_via_registers": "ttg.local_load" in k.asm["ttgir"]}
        row.update(_ptxas(k.asm["ptx"]))
        rows.append(row)
        print(json.dumps(row), flush=True)

    def gt(n):
        if n in ("a_desc", "w_desc"):
            return "tensordesc<fp8e4nv[128, 128]>"
        return "*u8" if n == "out_ptr" else "*fp32" if n.endswith("_ptr") else "i32"

    k = _build(tg._linear_geglu_kernel, dict(HAS_BIAS=True, QUANT=True, OSCALE_PER_CH=False, BITCAST_FP8=False,
                                             EMULATE=False, BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8), gt, 8, 3)
    row = {"kernel": "linear_geglu", "act": "fp8", "config": [128, 128, 128, 8, 3],
           "a_via_registers": "ttg.local_load" in k.asm["ttgir"]}
    row.update(_ptxas(k.asm["ptx"]))
    rows.append(row)
    print(json.dumps(row))
    # DIFFQUANT_FP8_ACC=precise (FP8 products promoted every 64): what it adds, FP8, 128 x 128 x 128 tiles
    import re

    for name, fn, consts, types, warps, stages in (
            ("tma (2-D, padded copy)", tt._qconv_tma_kernel,
             dict(KW=3, A_INT=False, BITCAST_FP8=False, HAS_ASCALE=True, HAS_CORR=False, HAS_BIAS=True, HAS_ADD=True,
                  BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8), _conv_types("fp8e4nv", "128, 128", "128, 128"), 8, 4),
            ("linear_geglu", tg._linear_geglu_kernel,
             dict(HAS_BIAS=True, QUANT=True, OSCALE_PER_CH=False, BITCAST_FP8=False, EMULATE=False, BLOCK_M=128,
                  BLOCK_N=128, BLOCK_K=128, GROUP_M=8), gt, 8, 3)):
        for acc in (None, 64):
            k = _build(fn, dict(consts, FP8_ACC=acc), types, warps, stages)
            row = {"kernel": name + ("" if acc is None else " (precise FP8 accumulation, every 64)"), "act": "fp8",
                   "config": [128, 128, 128, warps, stages], "a_via_registers": "ttg.local_load" in k.asm["ttgir"],
                   "fp32_adds_in_ptx": len(re.findall(r"\badd(\.rn)?\.f32", k.asm["ptx"]))}
            row.update(_ptxas(k.asm["ptx"]))
            rows.append(row)
            print(json.dumps(row), flush=True)

    from diffquant.kernels import triton_attention as ta

    def at(n):
        if n in ("q_ptr", "k_ptr", "v_ptr", "o_ptr"):
            return "*u8"
        return "*fp32" if n.endswith("_ptr") else "fp32" if n == "sm_scale" else "i32"

    for d in (40, 80, 160):  # SD-1.5's head widths, the default config of pick_attn_config at 4,096 queries
        bd = max(32, triton.next_power_of_2(d))
        cfg = ta.pick_attn_config(4096, bd)
        for even in (True, False):
            k = _build(ta._fp8_attn_kernel, dict(D=d, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=64, BLOCK_D=bd, EMULATE=False,
                                                 QUANT_OUT=True, EVEN_K=even), at, cfg["num_warps"], cfg["num_stages"])
            row = {"kernel": f"fp8_attention d{d}" + ("" if even else " (key mask)"), "act": "fp8",
                   "config": [cfg["BLOCK_M"], 64, bd, cfg["num_warps"], cfg["num_stages"]],
                   "a_via_registers": None, "shared_bytes": k.metadata.shared}
            row.update(_ptxas(k.asm["ptx"]))
            rows.append(row)
            print(json.dumps(row), flush=True)
    with open(a.out, "w") as f:
        json.dump({"command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d"),
                   "triton": triton.__version__, "target": "sm_90a (compiled without a GPU)", "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
