"""Join a bench row's kernel profile with Inductor's generated code (what ``scripts/gpu/inductor_code.sh`` brings back):
for each listed Triton kernel, its GPU ms and calls per model call, and what its source does (loads, stores and their
dtypes, reductions, whether it quantizes), with an estimate of the bytes a launch moves (``est_MB``, from the source's
sizes and accesses, see :func:`traffic_bytes`) and the bandwidth that implies (``est_TB_s``: a calculation from the
estimate and the measured time). Runs anywhere (no GPU).

    python benchmarks/inductor_kernels.py ROW_JSON CODE_LOG[.gz] [--top 40] [--grep group_norm]

Two runs side by side (e.g. bf16-compile and dq-fp8) show where the extra fused time goes.
"""
from __future__ import annotations

import argparse
import gzip
import json
import re

_LOG_PREFIX = re.compile(r"^[A-Z]\d{4} [^\n]*?\[__output_code\] ?", re.M)
_KERNEL_DEF = re.compile(r"^(triton_[A-Za-z0-9_]+)\s*=\s*async_compile\.triton\(\s*'([^']+)'", re.M)


def kernel_sources(log_text: str) -> dict[str, str]:
    """Kernel name -> its Triton source, from Inductor's output code (``TORCH_LOGS=output_code``): each kernel is
    defined as ``name = async_compile.triton('name', '''source''', ...)``."""
    # with TORCH_LOGS=output_code each line carries the logger's prefix ("V1129 14:04:45.26 817 torch/_inductor/
    # graph.py:2552] [8/0_1] [__output_code] "): strip it
    log_text = _LOG_PREFIX.sub("", log_text)
    out: dict[str, str] = {}
    for m in _KERNEL_DEF.finditer(log_text):
        start = log_text.find("'''", m.end())
        end = log_text.find("'''", start + 3) if start >= 0 else -1
        if start >= 0 and end > start:
            out.setdefault(m.group(1), log_text[start + 3:end])
    return out


def summarize(src: str) -> dict:
    """What a generated kernel does, read from its source."""
    stores = re.findall(r"tl\.store\([^\n]*", src)
    return {
        "loads": len(re.findall(r"tl\.load\(", src)),
        "stores": len(stores),
        "stores_fp8": sum("float8" in s or "fp8" in s for s in stores) + len(re.findall(r"\.to\(tl\.float8", src)),
        "reduction": bool(re.search(r"tl\.sum\(|triton_helpers\.(max|min|welford)|tl\.reduce\(", src)),
        "welford": "welford" in src,
        "quantizes": bool(re.search(r"float8|clamp|448\.0", src)),
    }


_ELT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8, "fp8e4nv": 1, "fp8e5": 1, "i8": 1, "u8": 1, "i1": 1,
              "i16": 2, "i32": 4, "i64": 8}
_ACCESS = re.compile(r"tl\.(load|store)\((\w+) \+ \(([^)]*)\)(.*)")


def traffic_bytes(src: str):
    """An estimate of the bytes a generated kernel moves per launch, from its source: each ``tl.load`` / ``tl.store``
    whose index depends on the row variables (x*) counts every element (xnumel, times r0_numel when it also depends
    on the reduction variables); an index over the reduction variables only counts once (a per-channel vector), and
    a row-dependent load Inductor marks ``evict_last`` (a small tensor broadcast over rows) not at all. None when the sizes or pointer dtypes are not in the source (dynamic shapes)."""
    xm = re.search(r"^\s*xnumel = (\d+)", src, re.M)
    if not xm:
        return None
    xn = int(xm.group(1))
    rm = re.search(r"^\s*r0_numel = (\d+)", src, re.M)
    rn = int(rm.group(1)) if rm else 1
    dtypes = dict(re.findall(r"'(\w+)': '\*(\w+)'", src))
    total = 0
    for kind, ptr, index, rest in _ACCESS.findall(src):
        if ptr not in dtypes or dtypes[ptr] not in _ELT_BYTES:
            return None
        uses_x = re.search(r"\bx", index) is not None
        uses_r = re.search(r"\br", index) is not None
        if not uses_x:  # a vector over the reduction axis (or a scalar), read by every row
            n = rn if uses_r else 1
        elif kind == "load" and "evict_last" in rest:  # a small tensor broadcast over rows (x0 % C): in cache
            n = 0
        else:
            n = xn * (rn if uses_r else 1)
        total += n * _ELT_BYTES[dtypes[ptr]]
    return total


def table(row_json: dict, sources: dict[str, str], top: int = 40, grep: str = "") -> list[dict]:
    """The profile's Triton kernels (``kernel_breakdown[*].top_kernels``) joined with their sources' summary."""
    rows = []
    for kb in row_json.get("kernel_breakdown", []):
        for name, ms, calls in kb["top_kernels"]:
            if not name.startswith("triton_") or (grep and grep not in name):
                continue
            src = sources.get(name)
            row = {"variant": kb.get("variant"), "kernel": name, "ms": ms, "calls": calls,
                   **(summarize(src) if src is not None else {"source": "not in the log"})}
            nbytes = traffic_bytes(src) if src is not None else None
            if nbytes is not None and ms > 0:
                row["est_MB"] = round(nbytes / 1e6, 2)
                row["est_TB_s"] = round(nbytes * calls / (ms * 1e-3) / 1e12, 2)
            rows.append(row)
    rows.sort(key=lambda r: -r["ms"])
    return rows[:top]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("row_json")
    ap.add_argument("code_log")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--grep", default="")
    a = ap.parse_args()
    opener = gzip.open if a.code_log.endswith(".gz") else open
    with opener(a.code_log, "rt", errors="replace") as f:
        sources = kernel_sources(f.read())
    with open(a.row_json) as f:
        row = json.load(f)
    rows = table(row, sources, a.top, a.grep)
    from diffquant.commands._common import format_table

    print(f"{len(sources)} kernels in the log")
    print(format_table(rows, ["kernel", "ms", "calls", "est_MB", "est_TB_s", "loads", "stores", "stores_fp8",
                              "reduction", "welford", "quantizes"]))


if __name__ == "__main__":
    main()
