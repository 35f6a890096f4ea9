"""What the row-statistics epilogue (``STATS=True`` on ``_qconv_tma4d_kernel``, ``diffquant::qconv_stats``) adds to
the compiled 4-D conv kernel, without a GPU: Triton compiles it for sm_90 and ptxas reads registers and spills
(:mod:`ptxas_report`'s helpers); the TTGIR's layout conversions are listed by shape, and the PTX's barriers and
warp shuffles counted (the epilogue's reductions over the tile's pixels are shuffles within a warp, then shared
memory and barriers across warps). Needs a Triton with its
bundled ptxas (the GPU machine's 3.6: ``/tmp/t36`` in the closing notes).

    PYTHONPATH=src python benchmarks/stats_epilogue_probe.py [--out benchmarks/results/stats_epilogue_probe.jsonl]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys


def main() -> None:
    ap = argparse.ArgumentParser(description="registers, spills and layout conversions of the 4-D conv kernel with and "
                                             "without its row-statistics epilogue (sm_90, compiled on this machine)")
    ap.add_argument("--out", default="benchmarks/results/stats_epilogue_probe.jsonl")
    a = ap.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from ptxas_report import _build, _conv_types, _ptxas  # needs Triton (and its ptxas)

    from diffquant.kernels import triton_conv_tma as tt

    def types(a_box: str, b_box: str):
        conv = _conv_types("fp8e4nv", a_box, b_box)
        return lambda n: "*fp32" if n in ("mean_ptr", "m2_ptr") else conv(n)

    rows = []
    # (BI, BH, BW, BLOCK_N, BLOCK_K, warps, stages): CIFAR's 32x32 level, SD's 64x64 level, a 16x16 level
    for bi, bh, bw, bn, bk, warps, stages in ((1, 4, 32, 128, 128, 8, 3), (1, 2, 64, 256, 128, 8, 3),
                                              (1, 8, 16, 128, 128, 4, 4)):
        for stats in (False, True, "dot"):  # dot: DIFFQUANT_GN_STATS_EPILOGUE=dot
            consts = dict(KH=3, KW=3, A_INT=False, BITCAST_FP8=False, PAD_FIX=False, HAS_ASCALE=True, HAS_CORR=False,
                          HAS_BIAS=True, HAS_ADD=False, BI=bi, BH=bh, BW=bw, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
                          STATS=bool(stats), STATS_DOT=stats == "dot")
            k = _build(tt._qconv_tma4d_kernel, consts, types(f"{bi}, {bh}, {bw}, {bk}", f"{bn}, {bk}"), warps, stages)
            conv = re.findall(r"convert_layout %\S+ : tensor<([0-9x]+[a-zA-Z0-9]+),", k.asm["ttgir"])
            ptx = k.asm["ptx"]
            row = dict(tile=[bi, bh, bw, bn, bk, warps, stages], stats=stats, shared_bytes=k.metadata.shared,
                       layout_conversions=conv, barriers=len(re.findall(r"\bbar\.sync\b|\bbarrier\.sync\b", ptx)),
                       shuffles=ptx.count("shfl.sync"))
            row.update(_ptxas(k.asm["ptx"]))
            print(json.dumps(row), flush=True)
            rows.append(row)
    with open(a.out, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
