"""How many MUFU (special-function unit) instructions ptxas makes of each PTX exponential on Hopper: one kernel per
form, compiled for sm_90a by Triton's bundled ``ptxas`` and disassembled by its ``cuobjdump``, counting the SASS
``MUFU`` instructions per two exponentials. The question behind it: at SD-1.5's head dim 40, attention is bound by
the softmax's exponentials (MUFU throughput), so a packed exponential that did two per instruction would halve that
bound. Needs Triton (for its ptxas and cuobjdump); no GPU.

    python benchmarks/mufu_probe.py [--out benchmarks/results/mufu_probe.json]
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

# PTX form -> (instruction, how it takes its operand: "f32" per element, "x2" packed per two elements)
FORMS = {"ex2.approx.ftz.f32": "f32", "ex2.approx.f32": "f32", "ex2.approx.ftz.bf16x2": "x2",
         "ex2.approx.f16x2": "x2", "tanh.approx.f32": "f32"}

PTX = """.version 8.0
.target sm_90a
.address_size 64
.visible .entry k(.param .u64 p, .param .u64 q)
{{
  .reg .b32 %r<8>;
  .reg .b64 %rd<4>;
  .reg .f32 %f<8>;
  ld.param.u64 %rd1, [p];
  ld.param.u64 %rd2, [q];
  ld.global.v2.b32 {{%r1, %r2}}, [%rd1];
{body}
  st.global.v2.b32 [%rd2], {{%r5, %r6}};
  ret;
}}
"""


def body(form: str, kind: str) -> str:
    """Two exponentials' worth of ``form``: two f32 instructions, or one packed instruction (its second output
    lane a copy, so that both stores have a value)."""
    if kind == "f32":
        return (f"  mov.b32 %f1, %r1;\n  mov.b32 %f2, %r2;\n  {form} %f3, %f1;\n  {form} %f4, %f2;\n"
                "  mov.b32 %r5, %f3;\n  mov.b32 %r6, %f4;")
    return f"  {form} %r5, %r1;\n  mov.b32 %r6, %r5;"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/mufu_probe.json")
    a = ap.parse_args()
    import triton

    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for form, kind in FORMS.items():
            ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
            with open(ptx, "w") as f:
                f.write(PTX.format(body=body(form, kind)))
            subprocess.run([os.path.join(bindir, "ptxas"), "-arch=sm_90a", ptx, "-o", cubin], check=True)
            sass = subprocess.run([os.path.join(bindir, "cuobjdump"), "-sass", cubin], check=True, capture_output=True,
                                  text=True).stdout
            mufu = re.findall(r"MUFU\.[A-Z0-9.]+", sass)
            rows.append({"ptx": form, "exponentials": 2, "ptx_instructions": 2 if kind == "f32" else 1,
                         "sass_mufu": len(mufu), "sass_mufu_forms": sorted(set(mufu))})
            print(json.dumps(rows[-1]), flush=True)
    res = {"command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d"), "triton": triton.__version__,
           "target": "sm_90a", "rows": rows}
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
