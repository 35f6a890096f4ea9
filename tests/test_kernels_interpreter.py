"""The Triton conv kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1) against the reference op.

Skipped where Triton is not installed (CI installs none); with Triton on a CPU machine
(``pip install triton``) they check the kernels' index arithmetic, masks, padding and epilogues without a GPU,
including the experimental TMA path. Each case runs in a subprocess: the interpreter has to be switched on
before the kernels are defined. Outputs are poisoned (NaN) so that an element the kernel does not write fails.
Written against Triton 3.9's interpreter; the GPU machine's Triton 3.6 interpreter fails every case here with
numpy 2 ("only 0-dimensional arrays can be converted to Python scalars", 2026-11-28), while the sm_90 compile tests
pass with both 3.6 and 3.9.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


def _run_script(code: str, env: dict, timeout: int = 600) -> list:
    """Run ``code`` in a subprocess (the interpreter must be on before the kernels are defined) and return the JSON
    list it prints after ``RESULT``."""
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT")]
    assert p.returncode == 0 and line, p.stderr[-3000:]
    return json.loads(line[0][len("RESULT"):])

SCRIPT = r'''
import json, os, sys
sys.path.insert(0, {tests!r}); sys.path.insert(0, {src!r})
import torch
import diffquant.kernels.reference as ref_mod
_out_like = ref_mod.out_like
def poisoned(*a, **k):
    return _out_like(*a, **k).fill_(float("nan"))
ref_mod.out_like = poisoned
from diffquant.kernels import qconv_ref
from diffquant.kernels.reference import pad_correction
from diffquant.kernels.triton_conv import qconv_triton
import test_kernels as tk
cases = json.loads({cases!r})
res = []
for kind, kw, stride, pad, with_add, slice_ch in cases:
    c = tk._rand_case(kind, **kw)
    if slice_ch:  # a channel slice of a channels-last tensor (split-shortcut second half)
        c["x"] = c["x"][:, slice_ch:]
        c["w"] = c["w"][..., slice_ch:].contiguous()
        c["pad_corr"] = pad_correction(c["w"], c["a_zp"]) if c["pad_corr"] is not None else None
    if with_add:
        ho = (kw["h"] + 2 * pad - kw.get("k", 3)) // stride + 1
        wo = (kw["w"] + 2 * pad - kw.get("k", 3)) // stride + 1
        c["add"] = torch.randn(kw["n"], kw["cout"], ho, wo).contiguous(memory_format=torch.channels_last)
    got = tk._call(qconv_triton, c, stride, pad)
    want = tk._call(qconv_ref, c, stride, pad).float()
    res.append([bool(torch.isfinite(got).all()), float((got - want).abs().max() / want.abs().max().clamp_min(1e-6))])
print("RESULT" + json.dumps(res))
'''

GATHER_CASES = [
    ("int8", dict(n=2, cin=40, cout=24, h=7, w=6, a_zp=4), 1, 1, False, 0),
    ("int8", dict(n=2, cin=96, cout=64, h=8, w=8, a_zp=4), 1, 1, True, 32),
    ("fp8", dict(n=1, cin=48, cout=40, h=9, w=5), 2, 1, False, 0),
    ("w4a8", dict(n=2, cin=64, cout=24, h=5, w=6, wzp=True, a_zp=3), 1, 1, False, 0),
    ("w4a16", dict(n=2, cin=64, cout=24, h=5, w=6), 1, 0, True, 0),
]
TMA_CASES = [
    ("int8", dict(n=2, cin=32, cout=24, h=6, w=5, a_zp=3), 1, 1, True, 0),
    ("fp8", dict(n=2, cin=48, cout=40, h=7, w=4), 1, 1, False, 0),
    ("int8", dict(n=3, cin=64, cout=32, h=5, w=5, k=1), 1, 0, False, 0),
    ("fp8", dict(n=1, cin=128, cout=16, h=9, w=3), 1, 1, True, 0),
    ("int8", dict(n=2, cin=96, cout=64, h=8, w=8, a_zp=4), 1, 1, False, 32),
]


def _run(cases, path: str = "gather"):
    """Run the cases in a subprocess under the interpreter; ``path``: the conv kernel (TMA paths by forced config)."""
    env = dict(os.environ, TRITON_INTERPRET="1", DIFFQUANT_QCONV_TMA="0",
               DIFFQUANT_QCONV_CONFIG="32,32,32,4,2")  # small tiles: several programs, tails in M, N and K
    code = SCRIPT.format(tests=str(ROOT / "tests"), src=str(ROOT / "src"), cases=json.dumps(cases))
    if path != "gather":
        env.pop("DIFFQUANT_QCONV_CONFIG")  # the TMA paths' tiles come from a forced config below
        cfg = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2, path=path)
        code = code.replace("got = tk._call(qconv_triton, c, stride, pad)",
                            "from diffquant.kernels import tuning\n"
                            f"    with tuning.forced_config({cfg!r}):\n"
                            "        got = tk._call(qconv_triton, c, stride, pad)")
    return _run_script(code, env)


def _spied_script(cases, cfg: dict, kernels: dict) -> str:
    """:data:`SCRIPT` on ``cases`` with ``cfg`` forced and the kernels of ``triton_conv_tma`` named in ``kernels``
    ({attribute: tag}) spied; its result list ends with their launches, [tag, grid] each, in order."""
    spied = "\n".join([
        "from diffquant.kernels import tuning",
        "    import diffquant.kernels.triton_conv_tma as tt",
        "    class Spy:",
        "        def __init__(self, k, tag): self.k, self.tag = k, tag",
        "        def __getitem__(self, grid):",
        "            launched.append([self.tag, list(grid)])",
        "            return self.k[grid]",
        f"    real = {{n: getattr(tt, n) for n in {list(kernels)!r}}}",
        f"    for n, tag in {kernels!r}.items(): setattr(tt, n, Spy(real[n], tag))",
        f"    with tuning.forced_config({cfg!r}):",
        "        got = tk._call(qconv_triton, c, stride, pad)",
        "    for n, k in real.items(): setattr(tt, n, k)"])
    code = SCRIPT.format(tests=str(ROOT / "tests"), src=str(ROOT / "src"), cases=json.dumps(cases))
    code = code.replace("got = tk._call(qconv_triton, c, stride, pad)", spied)
    code = code.replace("res = []\n", "res = []\nlaunched = []\n", 1)
    return code.replace('print("RESULT" + json.dumps(res))', 'print("RESULT" + json.dumps(res + [launched]))')


def test_interpreter_gather_kernel_matches_reference():
    for case, (finite, rel) in zip(GATHER_CASES, _run(GATHER_CASES)):
        assert finite and rel < 1e-5, (case, rel)


def test_interpreter_tma_path_matches_reference():
    for case, (finite, rel) in zip(TMA_CASES, _run(TMA_CASES, "tma")):
        assert finite and rel < 1e-5, (case, rel)


TMA4D_CASES = TMA_CASES + [
    ("fp8", dict(n=3, cin=32, cout=48, h=13, w=7), 1, 1, True, 16),  # a 16-channel slice: strided rows, no copy
    ("int8", dict(n=1, cin=64, cout=16, h=4, w=4, a_zp=-7), 1, 1, False, 0),  # several images per tile
]


def test_interpreter_tma4d_path_matches_reference():
    """The 4-D TMA boxes: padding from out-of-bounds zero fill (+ the int8 zero point's epilogue fix-up), tiles of
    whole rows or several images, channel slices read in place."""
    for case, (finite, rel) in zip(TMA4D_CASES, _run(TMA4D_CASES, "tma4d")):
        assert finite and rel < 1e-5, (case, rel)


def test_interpreter_tma4d_wide_tiles_match_reference():
    """Wide tiles (``BLOCK_N2``: BLOCK_N + BLOCK_N2 output channels a program, two accumulators from one A tile) on the
    4-D kernel's cases: channel counts that end inside the first block, inside the second, or past both; the int8 zero
    point's fix-up, residual adds and channel slices; the wide kernel must be the one launched. Under split-K the same
    config runs its BLOCK_N tiles."""
    if str(ROOT / "src") not in sys.path:
        sys.path.insert(0, str(ROOT / "src"))
    import diffquant.kernels.triton_conv_tma as tt

    env = dict(os.environ, TRITON_INTERPRET="1", DIFFQUANT_QCONV_TMA="0")
    env.pop("DIFFQUANT_QCONV_CONFIG", None)
    for cfg in (dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2, path="tma4d", BLOCK_N2=16),
                dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2, path="tma4d", BLOCK_N2=16,
                     SPLIT_K=2)):
        res = _run_script(_spied_script(TMA4D_CASES, cfg, {"_qconv_tma4d_wide_kernel": "wide"}), env)
        launched = [grid for _, grid in res[-1]]
        if "SPLIT_K" in cfg:
            assert launched == []
        else:  # one launch a case; the grid counts tiles of 48 channels (cout 40 -> 1, 64 -> 2, 16 -> 1)
            want = []
            for _, kw, stride, pad, _, sl in TMA4D_CASES:
                k = kw.get("k", 3)
                ho, wo = kw["h"] + 2 * pad - k + 1, kw["w"] + 2 * pad - k + 1
                bi, bh, bw = tt.tile_4d(32, ho, wo)
                want.append([-(-kw["n"] // bi) * -(-ho // bh) * -(-wo // bw) * -(-kw["cout"] // 48)])
            assert launched == want, (launched, want)
        for case, (finite, rel) in zip(TMA4D_CASES, res[:-1]):
            assert finite and rel < 1e-5, (cfg, case, rel)


SC_SCRIPT = r'''
import json, sys
sys.path.insert(0, {tests!r}); sys.path.insert(0, {src!r})
import torch
import diffquant.kernels.reference as ref_mod
_out_like = ref_mod.out_like
ref_mod.out_like = lambda *a, **k: _out_like(*a, **k).fill_(float("nan"))
from diffquant.kernels import tuning
from diffquant.kernels.reference import qconv_sc_reference
from diffquant.kernels.triton_conv import qconv_sc_triton
import diffquant.kernels.triton_conv_tma as tt
import test_kernels as tk
launched, res = [], []
class Spy:
    def __init__(self, k, tag):
        self.k, self.tag = k, tag
    def __getitem__(self, grid):
        launched.append([self.tag, list(grid)])
        return self.k[grid]
tt._qconv_tma4d_sc_kernel = Spy(tt._qconv_tma4d_sc_kernel, "sc")
tt._qconv_tma4d_sc_wide_kernel = Spy(tt._qconv_tma4d_sc_wide_kernel, "wide")
cfg = json.loads({cfg!r})
for kw, forced in json.loads({cases!r}):
    c = tk._sc_case(**kw)
    if forced:
        with tuning.forced_config(cfg):
            got = tk._sc_call(qconv_sc_triton, c)
    else:
        got = tk._sc_call(qconv_sc_triton, c)
    want = tk._sc_call(qconv_sc_reference, c)
    res.append([bool(torch.isfinite(got).all()), float((got - want).norm() / want.norm())])
print("RESULT" + json.dumps(res + [launched]))
'''

SC_CASES = [  # (_sc_case arguments, tile config forced)
    (dict(c=48, parts=(48, 32)), True),  # two sources; channel tails in conv2's and the first source's K loops
    (dict(n=1, c=16, cout=16, h=4, w=8, parts=(32,)), True),  # one source (a down block's shortcut)
    (dict(n=3, c=48, cout=24, h=3, w=3, parts=(16, 48)), True),  # several images a tile
    (dict(n=1, c=32, cout=48, h=4, w=4, k=1, parts=(16,)), True),  # a 1x1 conv2
    (dict(n=1, c=16, cout=8, h=3, w=5, parts=(16, 8)), False),  # 24-byte rows: not for TMA, the composed qconv calls
    (dict(n=2, c=32, cout=40, h=5, w=6, parts=(48,), sc_k=3), True),  # a split 3x3 conv: a 3x3 source, padded taps
    (dict(n=1, c=16, cout=24, h=4, w=4, parts=(16, 32), sc_k=3), True),  # two 3x3 sources
    (dict(n=1, c=32, cout=24, h=4, w=4, parts=(16,), sc_k=3, x_extra=16), True),  # the input a channel slice, in place
]


def test_interpreter_conv_with_its_shortcut_matches_reference():
    """diffquant::qconv_sc's kernels (conv2's taps, then each shortcut source's K loop in the same accumulator,
    rescaled between sources by the ratio of their scales; and the same with wide tiles, two accumulators): one and
    two sources, channel tails, tiles of several images, a 1x1 conv2, channel counts ending in either block of a
    wide tile, against the float64 reference with poisoned outputs; the launch grids; a source whose rows TMA cannot
    read runs the composed qconv calls instead (no launch)."""
    env = dict(os.environ, TRITON_INTERPRET="1", DIFFQUANT_QCONV_TMA="0")
    base = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2, path="tma4d")
    for cfg, tag, wide in ((base, "sc", 32), (dict(base, BLOCK_N2=16), "wide", 48)):
        code = SC_SCRIPT.format(tests=str(ROOT / "tests"), src=str(ROOT / "src"), cases=json.dumps(SC_CASES),
                                cfg=json.dumps(cfg))
        res = _run_script(code, env)
        for case, (finite, rel) in zip(SC_CASES, res[:-1]):
            assert finite and rel < 1e-5, (cfg, case, rel)
        # tiles (32 pixels): 2 images x 2 row blocks; 1; 3 images of 3x3, two a tile (2x4x4 boxes): 2; one 4x4 image
        # a tile (half empty); each x the channel blocks of 32 (or 32 + 16) channels: cout 40, 16, 24, 48
        want = [[tag, [m * -(-cout // wide)]] for m, cout in ((4, 40), (1, 16), (2, 24), (1, 48), (4, 40), (1, 24),
                                                                   (1, 24))]
        assert res[-1] == want, (res[-1], want)

def test_interpreter_tma4d_persistent_path_matches_reference():
    """The persistent 4-D TMA kernel: three programs in the interpreter, each walking several output tiles (and the
    tiles' channel blocks), on the same cases as the one-tile-per-program kernel."""
    for case, (finite, rel) in zip(TMA4D_CASES, _run(TMA4D_CASES, "tma4dp")):
        assert finite and rel < 1e-5, (case, rel)


TMA4DR_CASES = [  # output rows of 64 pixels or more (each row one dot of M >= 64), with the config forced below
    ("fp8", dict(n=1, cin=32, cout=40, h=5, w=64), 1, 1, True, 0),  # 5 rows: the last tile's rows partly outside
    ("int8", dict(n=3, cin=32, cout=24, h=2, w=64, a_zp=5), 1, 1, False, 0),  # rows of two images a tile; 3 images
    ("int8", dict(n=1, cin=64, cout=16, h=3, w=66, a_zp=-3), 1, 1, True, 32),  # 128-wide rows, 66 valid; a slice
    ("fp8", dict(n=1, cin=48, cout=24, h=3, w=64), 1, 1, False, 0),  # a channel tail in the last K block
    ("int8", dict(n=1, cin=32, cout=16, h=4, w=64, k=1, a_zp=2), 1, 0, False, 0),  # 1x1, no padding
]


def test_interpreter_tma4d_rows_path_matches_reference():
    """The one-dot-per-row 4-D TMA kernel ("tma4dr"): tiles of 2 and 4 rows of 64 (and 2 of 128), rows past the
    image, rows from two images, the int8 zero point's padding fix per row, residual adds and channel slices; the
    rows kernel itself must have run (a spy counts its launches)."""
    if str(ROOT / "src") not in sys.path:
        sys.path.insert(0, str(ROOT / "src"))
    import diffquant.kernels.triton_conv_tma as tt

    assert [tt.rows_split(bm, ho, wo) for bm, ho, wo in ((128, 64, 64), (256, 64, 64), (64, 64, 64), (256, 4, 32),
                                                         (256, 3, 66), (128, 3, 66), (128, 40, 40))] == [2, 4, None, None, 2, None, None]
    env = dict(os.environ, TRITON_INTERPRET="1", DIFFQUANT_QCONV_TMA="0")
    for bm in (128, 256):
        cfg = dict(BLOCK_M=bm, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2, path="tma4dr")
        res = _run_script(_spied_script(TMA4DR_CASES, cfg, {"_qconv_tma4d_rows_kernel": "rows"}), env)
        res[-1] = len(res[-1])
        # every case takes the rows kernel, except the 128-wide rows at BLOCK_M 128 (one row a tile: plain kernel)
        assert res[-1] == (5 if bm == 256 else 4), (bm, res[-1])
        for case, (finite, rel) in zip(TMA4DR_CASES, res[:-1]):
            assert finite and rel < 1e-5, (bm, case, rel)


SPLITK_CASES = TMA4D_CASES + [
    ("int8", dict(n=2, cin=64, cout=48, h=8, w=8, a_zp=5), 1, 1, True, 0),  # the zero point's fix-up after the sum
]


def test_interpreter_tma4d_split_k_matches_reference():
    """Split-K ("SPLIT_K" on a tma4d or tma config): 2 to 4 programs a tile over parts of the K loop, partials in a
    workspace summed by the reduce kernel, whose epilogue does the int8 zero point's padding fix (tma4d; tma pads its
    copy with the zero point), the residual add, and writes every element (poisoned output) through 32-row blocks
    that cross tiles (tma4d's tile order, or the padded copy's rows with their pad band); a 1x1 conv of 2 K steps
    asked for 3 or 4 splits gets 2. Both kernels must have run (spies count their launches)."""
    if str(ROOT / "src") not in sys.path:
        sys.path.insert(0, str(ROOT / "src"))
    import diffquant.kernels.triton_conv_tma as tt

    assert tt.split_k_steps(90, 4) == (4, 23) and tt.split_k_steps(2, 4) == (2, 1) and tt.split_k_steps(9, 4) == (3, 3)
    env = dict(os.environ, TRITON_INTERPRET="1", DIFFQUANT_QCONV_TMA="0")
    for path, split in (("tma4d", 2), ("tma4d", 4), ("tma", 3)):
        cfg = dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2, path=path, SPLIT_K=split)
        res = _run_script(_spied_script(SPLITK_CASES, cfg, {f"_qconv_{path}_splitk_kernel": "split",
                                                            "_qconv_splitk_reduce_kernel": "reduce"}), env)
        launched = res[-1]
        assert [t for t, _ in launched] == ["split", "reduce"] * len(SPLITK_CASES), launched
        splits = [g[1] for t, g in launched if t == "split"]
        assert splits[2] == 2 and max(splits) == split, splits  # case 2: the 1x1 conv of 2 K steps
        for case, (finite, rel) in zip(SPLITK_CASES, res[:-1]):
            assert finite and rel < 1e-5, (path, split, case, rel)


GEGLU_SCRIPT = r'''
import json, sys
sys.path.insert(0, {src!r})
import torch
import diffquant.kernels.triton_geglu as tg
from diffquant.kernels.reference import linear_geglu_reference
_new = tg.new_out
def poisoned(m, i, dtype, device):  # an element the kernel does not write stays NaN
    o = _new(m, i, dtype, device)
    if dtype == torch.float8_e4m3fn:
        o.view(torch.uint8).fill_(0x7F)
    else:
        o.fill_(float("nan"))
    return o
tg.new_out = poisoned
g = torch.Generator().manual_seed(0)
res = []
small = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=2)
# M, K, I tails against the tiles; bias or not; e4m3 output with one or I scales, or bf16
# the persistent kernel: 3 programs walking 9 and 8 tiles
for m, k, i, bias, oq, cfg in [(37, 48, 40, True, "fp8", small), (70, 32, 24, False, "bf16", dict(small, BLOCK_M=32)),
                               (33, 64, 48, True, "fp8_ch", None), (37, 48, 40, True, "fp8", dict(small, persistent=True)),
                               (70, 32, 24, False, "bf16", dict(small, BLOCK_M=32, persistent=True)),
                               # rows of 48 bytes: TMA stores (clipped at the M and I edges), or per-element stores
                               (37, 48, 48, True, "fp8", dict(small, persistent=True)),
                               (37, 48, 48, True, "fp8", dict(small, tma_out=False)),
                               # libdevice's erf instead of the polynomial (the default for e4m3 and bf16 outputs)
                               (33, 64, 48, True, "fp8_ch", dict(small, gelu="erf"))]:
    x = torch.randn(m, k, generator=g)
    a_s = x.abs().amax().reshape(1) / 448
    xq = (x / a_s).to(torch.float8_e4m3fn)
    w = torch.randn(2 * i, k, generator=g) * 0.1
    ws = w.abs().amax(1) / 448
    wq = (w / ws[:, None]).to(torch.float8_e4m3fn)
    b = torch.randn(2 * i, generator=g) if bias else None
    dt = torch.bfloat16 if oq == "bf16" else torch.float8_e4m3fn
    so = None if oq == "bf16" else (torch.rand(i, generator=g) * 0.01 + 0.002 if oq == "fp8_ch" else torch.tensor([0.005]))
    want = linear_geglu_reference(xq, wq, ws, a_s, b, so, dt).float()
    got = tg.linear_geglu_triton(xq, wq, ws, a_s, b, so, dt, config=cfg).float()
    if dt == torch.float8_e4m3fn:  # codes that differ (accumulation order may cross a rounding edge)
        res.append([bool(torch.isfinite(got).all()), float((got != want).float().mean()), "codes"])
    else:
        res.append([bool(torch.isfinite(got).all()), float((got - want).abs().max() / want.abs().max()), "bf16"])
print("RESULT" + json.dumps(res))
'''


GELU_SCRIPT = r'''
import json, math, sys
sys.path.insert(0, {src!r})
import torch
import triton
import triton.language as tl
from diffquant.kernels.triton_geglu import _gelu

@triton.jit
def k(x_ptr, y_ptr, N, POLY: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    tl.store(y_ptr + offs, _gelu(tl.load(x_ptr + offs, mask=ok, other=0.0), POLY, True), mask=ok)

x = torch.linspace(-12, 12, 240001)
want = x.double() * 0.5 * (1 + torch.special.erf(x.double() / math.sqrt(2)))
res = []
for poly in (True, False):
    y = torch.empty_like(x)
    k[(triton.cdiv(x.numel(), 4096),)](x, y, x.numel(), POLY=poly, BLOCK=4096)
    res.append(float((y.double() - want).abs().max()))
print("RESULT" + json.dumps(res))
'''


def test_interpreter_gelu_polynomial_error():
    """The GEGLU epilogue's GELU on [-12, 12] in fp32 against float64's exact GELU: the Abramowitz & Stegun
    polynomial (the default for e4m3 and 16-bit outputs) within 5e-7 absolute, the erf path within 1e-6 (on the
    interpreter, in numpy's fp32: 4.1e-7 and 4.5e-7, Triton 3.9, 2026-11-29)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    poly, erf = _run_script(GELU_SCRIPT.format(src=str(ROOT / "src")), env)
    assert poly < 5e-7 and erf < 1e-6, (poly, erf)


def test_interpreter_linear_geglu_kernel_matches_reference():
    """diffquant::linear_geglu's kernel (two accumulators over the same A tiles, GEGLU and e4m3 quantization in the
    epilogue) and its persistent form: row, column and K tails, with and without bias, one or per-channel output
    scales, bf16 output, the output stored by TMA or per element, GELU's erf by polynomial or libdevice; poisoned
    output buffers."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = _run_script(GEGLU_SCRIPT.format(src=str(ROOT / "src")), env)
    assert len(res) == 8
    for finite, err, kind in res:
        assert finite and err < {"codes": 5e-3, "bf16": 1e-2}[kind], (kind, err)


LN_SCRIPT = r'''
import json, sys
sys.path.insert(0, {src!r})
import torch
import diffquant.kernels.triton_layernorm as tl_mod
from diffquant.kernels.reference import add_layer_norm_reference
real_new_out = tl_mod.new_out
def poisoned(shape, dtype, device):  # an element the kernel does not write fails
    out = real_new_out(shape, dtype, device)
    return out.view(torch.uint8).fill_(0x7F).view(dtype) if dtype == torch.float8_e4m3fn else out.fill_(float("nan"))
tl_mod.new_out = poisoned
torch.manual_seed(0)
res = []
for t, c, dt in [(37, 320, torch.bfloat16), (9, 112, torch.bfloat16), (5, 40, torch.float16), (3, 1280, torch.bfloat16),
                 (1, 7, torch.float32)]:
    y, r = torch.randn(t, c).to(dt) * 4, torch.randn(t, c).to(dt) * 8
    ys, yb = torch.rand(c) * 0.02 + 0.01, torch.randn(c) * 0.1
    w, b = (torch.rand(c) + 0.5).to(dt), (torch.randn(c) * 0.1).to(dt)
    for args in ((ys, yb, r), (None, None, r), (None, None, None), (ys, None, None)):
        for o_scale, o_dt, wb in ((torch.tensor([0.02]), torch.float8_e4m3fn, (w, b)),
                                  (torch.rand(c) * 0.02 + 0.01, torch.float8_e4m3fn, (None, None)),
                                  (None, dt, (w, None))):
            h0, o0 = add_layer_norm_reference(y.view(1, t, c), *[a if a is None or a.dim() == 1 else a.view(1, t, c)
                                              for a in args], *wb, 1e-5, o_scale, o_dt)
            h1, o1 = tl_mod.add_layer_norm_triton(y.view(1, t, c), *[a if a is None or a.dim() == 1 else a.view(1, t, c)
                                                  for a in args], *wb, 1e-5, o_scale, o_dt)
            same_h = h0.shape == h1.shape and bool(torch.equal(h0, h1))
            o0, o1 = o0.float(), o1.float()
            # a difference: any in e4m3 / 16 bits; beyond fp32 rounding of the statistics in an fp32 output
            differ = (o0 - o1).abs() > (1e-5 * o0.abs().clamp_min(1) if o_dt == torch.float32 else 0)
            res.append([c, same_h, bool(torch.isfinite(o1).all()), float(differ.float().mean()), list(o1.shape)])
print("RESULT" + json.dumps(res))
'''


def test_interpreter_add_layer_norm_kernel_matches_reference():
    """diffquant::add_layer_norm's kernel against the reference: widths of two power-of-two chunks (320, 40, 1280),
    a padded chunk (112: three set bits) and a tiny one (7), bf16 / fp16 / fp32 activations, with and without the
    projection's scale and bias and the residual, e4m3 output with one or per-channel scales, no affine weights,
    16-bit output; poisoned outputs. The new residual equals the reference's bit for bit; of the outputs at most 0.1 %
    differ, by the rounding of the statistics (1 of 11,840 values in one case, 0 in the others, on the interpreter,
    Triton 3.9, 2026-11-29; bf16 rounding emulated there: its cast truncates)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = _run_script(LN_SCRIPT.format(src=str(ROOT / "src")), env)
    assert len(res) == 5 * 4 * 3
    for c, same_h, finite, differ, shape in res:
        assert same_h and finite and differ <= 1e-3 and shape[-1] == c, (c, same_h, finite, differ)
    assert sum(r[3] == 0.0 for r in res) >= len(res) - 3


ATTN_SCRIPT = r'''
import json, sys
sys.path.insert(0, {src!r})
import torch
from diffquant.kernels.reference import (fp8_attention_fp8_reference, fp8_attention_quantize, fp8_attention_reference,
                                       fp8_attention_scales)
from diffquant.kernels.triton_attention import fp8_attention_triton
torch.manual_seed(0)
res = []
for b, h, sq, sk, d in [(2, 3, 50, 77, 40), (1, 2, 130, 130, 64), (1, 1, 17, 5, 16), (1, 2, 70, 128, 40), (1, 1, 33, 65, 40)]:
    q, k, v = torch.randn(b, h, sq, d), torch.randn(b, h, sk, d), torch.randn(b, h, sk, d)
    scales = fp8_attention_scales(q, k, v)
    got = fp8_attention_triton(*fp8_attention_quantize(q, k, v, scales), d ** -0.5, q.dtype)
    assert got.transpose(1, 2).is_contiguous()
    want = fp8_attention_reference(q, k, v, d ** -0.5, scales)
    res.append([bool(torch.isfinite(got).all()), float((got - want).norm() / want.norm())])
    # another block config (the benchmark's sweep): the same result
    got = fp8_attention_triton(*fp8_attention_quantize(q, k, v, scales), d ** -0.5, q.dtype,
                               config=dict(BLOCK_M=32, num_warps=4, num_stages=2))
    res.append([bool(torch.isfinite(got).all()), float((got - want).norm() / want.norm())])
    # e4m3 output (the consumer's static input scale): the same values as the reference's quantized output
    o_scale = torch.tensor([0.005])
    got8 = fp8_attention_triton(*fp8_attention_quantize(q, k, v, scales), d ** -0.5, torch.float8_e4m3fn, out_scale=o_scale)
    want8 = fp8_attention_fp8_reference(*fp8_attention_quantize(q, k, v, scales), d ** -0.5, torch.float8_e4m3fn,
                                         out_scale=o_scale)
    res.append([bool(torch.isfinite(got8.float()).all()), float((got8.float() - want8.float()).norm() / want8.float().norm())])
    # through the op, which hands the kernel V8 with the keys contiguous (Hopper's 8-bit MMA wants P.V's B K-major)
    import diffquant.kernels.triton_attention as ta
    from diffquant.kernels.ops import fp8_attention
    seen, real = [], ta.fp8_attention_triton
    ta.fp8_attention_triton = lambda q8, k8, v8, *a, **kw: seen.append(v8.stride(2)) or real(q8, k8, v8, *a, **kw)
    try:
        got = fp8_attention(q, k, v, d ** -0.5)
    finally:
        ta.fp8_attention_triton = real
    assert seen == [1], seen
    want = fp8_attention_reference(q, k, v, d ** -0.5)
    res.append([bool(torch.isfinite(got).all()), float((got - want).norm() / want.norm())])
print("RESULT" + json.dumps(res))
'''


def test_interpreter_fp8_attention_kernel_matches_reference():
    """The FP8 attention kernel's online softmax, masking of the key tail (keys of one partial block, of whole blocks
    and a tail, of whole blocks only) and padding of the head dimension (40 -> 64, 16 -> 32: the row sum comes from
    the MMA through V's padding column; 64: summed in the kernel) against the reference; the interpreter emulates
    the e4m3 rounding (its own cast mis-rounds)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    for finite, rel in _run_script(ATTN_SCRIPT.format(src=str(ROOT / "src")), env):
        assert finite and rel < 1e-5, rel


def test_kernel_choice_follows_table_and_environment(monkeypatch):
    """Which conv kernel a call takes: the tuned table's ``path`` on the GPU model it names, unless
    DIFFQUANT_QCONV_TMA forces (1) or forbids (0) the TMA kernel; a TMA entry for a call the TMA kernel cannot run
    falls back to the gather heuristic."""
    import torch

    sys.path.insert(0, str(ROOT / "src"))
    from diffquant.kernels import triton_conv, tuning

    class _X:  # what _config reads of the input: its device and element size
        device = torch.device("cuda")

        @staticmethod
        def element_size():
            return 1

    monkeypatch.setattr(triton_conv, "_device_name", lambda dev: "GPU-A")
    monkeypatch.setattr(triton_conv, "_num_sms", lambda dev: 132)
    monkeypatch.delenv("DIFFQUANT_QCONV_TMA", raising=False)
    monkeypatch.delenv("DIFFQUANT_QCONV_CONFIG", raising=False)
    tma_cfg = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4, "path": "tma"}
    gather_cfg = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4}
    tuning.use_table({"format": tuning.FORMAT, "device": "GPU-A", "configs": {"kt": tma_cfg, "kg": gather_cfg}})
    try:
        both, only2d, none = frozenset({"tma", "tma4d"}), frozenset({"tma"}), frozenset()
        pick = lambda key, ok: triton_conv._config(_X, key, 4096, 320, 320, False, ok)  # noqa: E731
        assert pick("kt", both) == tma_cfg and pick("kg", both) == gather_cfg
        assert pick("kt", none).get("path") is None  # the TMA kernel cannot run it: heuristic, gather kernel
        assert pick("other", both).get("path") is None  # not in the table: heuristic, gather kernel
        monkeypatch.setenv("DIFFQUANT_QCONV_TMA", "0")
        assert pick("kt", both).get("path") is None and pick("kg", both) == gather_cfg
        monkeypatch.setenv("DIFFQUANT_QCONV_TMA", "1")
        assert pick("kt", both) == tma_cfg and pick("kg", both)["path"] == "tma" and pick("other", both)["path"] == "tma"
        assert pick("kg", none) == gather_cfg
        monkeypatch.setenv("DIFFQUANT_QCONV_TMA", "4dr")  # only tuned tma4d entries change: same tiles, rows kernel
        t4 = dict(tma_cfg, path="tma4d")
        tuning.use_table({"format": tuning.FORMAT, "device": "GPU-A", "configs": {"kt": tma_cfg, "kg": gather_cfg,
                                                                                 "k4": t4}})
        rows_ok = both | {"tma4dr"}
        assert pick("k4", rows_ok) == dict(t4, path="tma4dr") and pick("k4", both) == t4
        assert pick("kt", rows_ok) == tma_cfg and pick("kg", rows_ok) == gather_cfg
        assert pick("other", rows_ok).get("path") is None
        monkeypatch.setenv("DIFFQUANT_QCONV_TMA", "4d")
        assert pick("kt", both)["path"] == "tma4d" and pick("kg", both)["path"] == "tma4d"
        assert pick("kg", only2d) == gather_cfg and pick("kt", only2d) == tma_cfg  # 4-D impossible here: the table
        with tuning.forced_config(gather_cfg):  # the tuner's forced candidate wins over everything
            assert pick("kt", both) == gather_cfg
        # DIFFQUANT_QCONV_BORROW=1: a shape without an entry takes the same layer's entry at the nearest size
        monkeypatch.delenv("DIFFQUANT_QCONV_TMA")
        k8 = "fp8:8x320x64x64:o320:k3x3:s1x1:p1x1:d1x1:bfloat16"
        tuning.use_table({"format": tuning.FORMAT, "device": "GPU-A", "configs": {k8: tma_cfg}})
        k1 = k8.replace(":8x", ":1x")
        assert pick(k1, both).get("path") is None  # default: the heuristic
        monkeypatch.setenv("DIFFQUANT_QCONV_BORROW", "1")
        assert pick(k1, both) == tma_cfg and pick(k1, none).get("path") is None
    finally:
        tuning.use_table(None)


CANDIDATE_SCRIPT = r'''
import json, sys
sys.path.insert(0, {tests!r}); sys.path.insert(0, {src!r})
import test_kernels as tk
from diffquant.kernels import qconv_ref, tuning
from diffquant.kernels.triton_conv import qconv_triton
res = []
for kind, kw in [("fp8", dict(n=2, cin=320, cout=200, h=17, w=13)), ("int8", dict(n=3, cin=128, cout=128, h=9, w=7, a_zp=5))]:
    c = tk._rand_case(kind, **kw)
    want = tk._call(qconv_ref, c, 1, 1).float()
    for path in ("tma", "tma4d", "tma4dp"):  # with the split-K candidates of the FP8 shape (442 pixels, 27 K steps)
        for cfg in tuning.candidates(1, False, kw["cout"], kw["cin"], path=path, m=kw["n"] * kw["h"] * kw["w"]):
            with tuning.forced_config(cfg):
                got = tk._call(qconv_triton, c, 1, 1)
            res.append([kind, list(cfg.values()), float((got - want).abs().max() / want.abs().max())])
# the one-dot-per-row kernel's candidates, on rows of 64 pixels (its only shapes)
c = tk._rand_case("fp8", n=1, cin=128, cout=128, h=5, w=64)
want = tk._call(qconv_ref, c, 1, 1).float()
for cfg in tuning.candidates(1, False, 128, 128, path="tma4dr"):
    with tuning.forced_config(cfg):
        got = tk._call(qconv_triton, c, 1, 1)
    res.append(["fp8", list(cfg.values()), float((got - want).abs().max() / want.abs().max())])
print("RESULT" + json.dumps(res))
'''


def test_interpreter_every_tma_tuner_candidate_is_correct():
    """Each block config the tuner tries for the TMA kernels (tile shapes of 64-256 rows, whole-row boxes of 1-16
    image rows, split-K in 2 to 4, the few-tile layers' 64x64 tiles) on an odd SD-like shape (FP8) and an int8 one
    with a zero point; the
    one-dot-per-row kernel's on 64-pixel rows."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("DIFFQUANT_QCONV_CONFIG", None)
    res = _run_script(CANDIDATE_SCRIPT.format(tests=str(ROOT / "tests"), src=str(ROOT / "src")), env, timeout=900)
    assert len(res) >= 67 and sum(cfg[-1] == "tma4dr" for _, cfg, _ in res) == 5
    # split-K, x (tma, tma4d): FP8 (27 K steps at BLOCK_K 128, 45 at 64): 5 tiles x 2 splits + 1 x 3; int8 (9 and 18):
    # the BLOCK_K 64 tile in 2
    assert sum(cfg[-1] in (2, 3, 4) for _, cfg, _ in res) == 28
    for kind, cfg, rel in res:
        assert rel < 1e-5, (kind, cfg, rel)


GN_SCRIPT = r'''
import json, sys
sys.path.insert(0, {src!r})
import torch
import diffquant.kernels.reference as ref_mod
_out_like = ref_mod.out_like
def poisoned(*a, **k):  # NaN in every element (0x7F in e4m3; random bytes in int8): an unwritten element fails
    out = _out_like(*a, **k)
    if out.dtype == torch.int8:
        out.view(torch.uint8).copy_(torch.randint(0, 256, out.shape, dtype=torch.uint8))
    else:
        out.view(torch.uint8).fill_(0x7F) if out.dtype == torch.float8_e4m3fn else out.fill_(float("nan"))
    return out
ref_mod.out_like = poisoned
from diffquant.kernels.reference import group_norm_act_reference
from diffquant.kernels.triton_norm import group_norm_act_triton, norm_plan, whole_plan
g = torch.Generator().manual_seed(0)
res = []
# n, c1, c2, h, w, groups, add, silu, fp8 out, input offset
for n, c1, c2, h, w, groups, add, silu, fp8, off in [(2, 40, 0, 5, 7, 8, False, True, False, 0.0),
                                                     (2, 24, 16, 5, 7, 8, True, True, True, 0.0),
                                                     (1, 64, 0, 9, 9, 32, False, False, False, 100.0),
                                                     (2, 320, 0, 6, 6, 32, True, True, True, 0.5),
                                                     (1, 96, 64, 3, 5, 32, False, True, False, 0.0),
                                                     (2, 48, 32, 4, 5, 16, True, True, "per_channel", 0.0),
                                                     (2, 40, 0, 5, 7, 8, True, True, "int8", 0.0),
                                                     (1, 48, 32, 4, 5, 16, False, True, "int8_per_channel", 0.3)]:
    x = (torch.randn(n, c1, h, w, generator=g) + off).contiguous(memory_format=torch.channels_last)
    x2 = torch.randn(n, c2, h, w, generator=g).contiguous(memory_format=torch.channels_last) if c2 else None
    c = c1 + c2
    a = torch.randn(n, c, generator=g) if add else None
    wt, b = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
    zp, q = None, (0, 0, 0)
    if fp8 in ("int8", "int8_per_channel"):  # the converted int8 layers' grid: inverse scale, zero point, offset 128
        per = c if fp8 == "int8_per_channel" else 1
        s, zp, q = torch.rand(per, generator=g) * 40 + 20, torch.randint(0, 255, (per,), generator=g).float(), (0, 255, 128)
        dt = torch.int8
    else:
        s = (torch.rand(c, generator=g) * 0.02 + 0.005) if fp8 == "per_channel" else torch.tensor([0.01]) if fp8 else None
        dt = torch.float8_e4m3fn if fp8 else torch.float32
    want = group_norm_act_reference(x, x2, a, wt, b, groups, 1e-5, silu, s, dt, zp, *q).float()
    # the default launch (one segment per image at these sizes; one group per finalize program at these batch
    # sizes), then 16-row pixel blocks in 16-row segments (a tail segment; the finalize combines many partials, 4
    # groups a program) and 16-channel chunks (groups straddle chunks), then segments of 32 rows (two where an image
    # has 33-64 pixels) with 32-row blocks (16 groups a finalize program: more than some layers have)
    # and the one-launch kernel for small images (blocks of whole groups; 16-row steps: several of them; one group
    # a program)
    for plan in (None, dict(norm_plan(n, c, h * w, x.device, block_c=16, block_p=16, programs=10**6), block_g=4),
                 dict(norm_plan(n, c, h * w, x.device, block_p=32 if h * w > 32 else 16, programs=10**6), block_g=16),
                 whole_plan(c, h * w, groups), dict(whole_plan(c, h * w, groups), block_p=16),
                 whole_plan(c, h * w, groups, gpp=1),
                 norm_plan(n, c, h * w, x.device, block_p=16, programs=10**6, stages=3),  # pipelined loads
                 # the finalize folded into apply: 16-channel chunks (groups straddling them) with many segments,
                 # and the default chunks
                 norm_plan(n, c, h * w, x.device, block_c=16, block_p=16, programs=10**6, fold=True),
                 norm_plan(n, c, h * w, x.device, fold=True)):
        got = group_norm_act_triton(x, x2, a, wt, b, groups, 1e-5, silu, s, dt, zp, *q, plan=plan).float()
        if fp8:  # summation order may move a value across a rounding edge: count the codes that differ
            res.append([bool(torch.isfinite(got).all()), float((got != want).float().mean()), "codes"])
        else:
            res.append([bool(torch.isfinite(got).all()), float((got - want).abs().max() / want.abs().max()), "f32"])
# the dual op: conv1's input and, from the same read, the shortcut conv's input (the raw values quantized)
from diffquant.kernels.reference import group_norm_act_dual_reference
from diffquant.kernels.triton_norm import group_norm_act_dual_triton
for out_kind, raw_kind in (("fp8", "fp8"), ("int8", "int8"), ("bf16", "fp8")):
    x = torch.randn(2, 24, 5, 7, generator=g).contiguous(memory_format=torch.channels_last)
    x2 = (torch.randn(2, 16, 5, 7, generator=g) * 3).contiguous(memory_format=torch.channels_last)
    wt, b = torch.rand(40, generator=g) + 0.5, torch.randn(40, generator=g)
    if out_kind == "int8":
        o = (torch.rand(1, generator=g) * 40 + 20, torch.int8, torch.randint(0, 255, (1,), generator=g).float(), 0, 255, 128)
    elif out_kind == "fp8":
        o = (torch.tensor([0.01]), torch.float8_e4m3fn, None, 0, 0, 0)
    else:
        o = (None, torch.float32, None, 0, 0, 0)
    if raw_kind == "int8":  # one inverse scale and zero point per channel (two halves of a split conv)
        r = (torch.rand(40, generator=g) * 40 + 20, torch.int8, torch.randint(0, 255, (40,), generator=g).float(), 0, 255, 128)
    else:
        r = (torch.rand(40, generator=g) * 0.02 + 0.005, torch.float8_e4m3fn, None, 0, 0, 0)
    args = (x, x2, wt, b, 8, 1e-5, True, o[0], o[1], o[2], o[3], o[4], o[5], *r)
    want_n, want_r = group_norm_act_dual_reference(*args)
    # the default launch (chunks of 64 channels straddle x and x2: two masked loads), chunks of 8 channels (each
    # wholly in x or x2: one plain load of one tensor) and the one-launch kernel
    for plan in (None, norm_plan(2, 40, 35, x.device, block_c=8, programs=10**6), whole_plan(40, 35, 8)):
        got_n, got_r = group_norm_act_triton(x, x2, None, wt, b, 8, 1e-5, True, *o, plan=plan, raw=r)
        if plan is None:
            got_n2, got_r2 = group_norm_act_dual_triton(*args)
            assert torch.equal(got_n2.float(), got_n.float()) and torch.equal(got_r2.float(), got_r.float())
        res.append([bool(torch.isfinite(got_n.float()).all()), float((got_r.float() != want_r.float()).float().mean()), "raw"])
        kind = "f32" if out_kind == "bf16" else "codes"
        err = (float((got_n.float() - want_n.float()).abs().max() / want_n.float().abs().max()) if kind == "f32"
               else float((got_n.float() != want_n.float()).float().mean()))
        res.append([bool(torch.isfinite(got_n.float()).all()), err, kind])
import os
from diffquant.kernels.triton_norm import _default_plan
assert "kind" not in _default_plan(2, 64, 64, 32, torch.device("cpu"))  # the segmented plan unless asked
os.environ["DIFFQUANT_GN_WHOLE_MAX_HW"] = "64"
assert _default_plan(2, 64, 64, 32, torch.device("cpu"))["kind"] == "whole"
assert "kind" not in _default_plan(2, 64, 65, 32, torch.device("cpu"))
print("RESULT" + json.dumps(res))
'''


def test_interpreter_group_norm_act_kernels_match_reference():
    """The channels-last GroupNorm kernels (tile statistics, Chan's combination, apply + SiLU + FP8 quantization):
    odd channel counts and pixel tails, a concatenated second input read in place, a per-channel addend, and an
    input offset of 100 (no cancellation), one FP8 scale per channel (a split consumer), int8 output with a zero
    point (per tensor and per channel), against the reference; outputs poisoned."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = _run_script(GN_SCRIPT.format(src=str(ROOT / "src")), env)
    assert len(res) == 72 + 18
    for finite, err, kind in res:
        assert finite, kind
        assert err < {"codes": 5e-3, "f32": 1e-5, "raw": 1e-9}[kind], (kind, err)


def _norm_arg_type(name: str) -> str:
    if name in ("x_ptr", "x2_ptr", "add_ptr", "w_ptr", "b_ptr"):
        return "*bf16"
    if name in ("gmean_ptr", "grstd_ptr", "so_ptr", "zp_ptr", "rso_ptr", "rzp_ptr", "mean_ptr", "m2_ptr"):
        return "*fp32"
    if name in ("out_ptr", "raw_ptr"):
        return "*u8"
    return "fp32" if name in ("eps", "inv_total") else "i32"


def test_group_norm_kernels_compile_for_hopper():
    """The GroupNorm kernels compile for sm_90 (Triton's own ptxas, no GPU needed) in every flag combination the op
    launches: FP8 / int8 / float output, per-tensor or per-channel scales, with and without the raw second output,
    segmented and one-launch. A frontend or type error in a branch the interpreter does not take shows up here,
    before any device time is spent."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if str(ROOT / "src") not in sys.path:  # a Triton venv without diffquant installed
        sys.path.insert(0, str(ROOT / "src"))
    from diffquant.kernels import triton_norm as tn

    def build(fn, consts):
        # constexprs with a default (LOAD_STAGES) take it unless given; sizes and pointers carry the divisibility by
        # 16 that Triton's launcher specializes on for the UNets' shapes (vector loads, asynchronous copies)
        consts = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}, **consts}
        sig = {n: "constexpr" if n in consts else _norm_arg_type(n) for n in fn.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
                 if n not in consts and (n.endswith("_ptr") or n in ("HW", "C1", "C", "SEG_P"))}
        src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})

    built = 0
    for quant, int8, per, raw, rint8, rper in [(True, False, False, False, False, False),
                                               (True, True, True, False, False, False),
                                               (True, False, True, True, False, True),
                                               (True, True, False, True, True, True),
                                               (False, False, False, True, False, False),
                                               (False, False, False, False, False, False)]:
        flags = dict(HAS_X2=True, HAS_ADD=not raw, SILU=True, QUANT=quant, INT8=int8, SCALE_PER_CH=per, RAW=raw,
                     RAW_INT8=rint8, RAW_PER_CH=rper, EMULATE=False)
        built += bool(build(tn._gn_apply_kernel, dict(flags, BLOCK_P=32, BLOCK_C=128)).asm.get("cubin"))
        built += bool(build(tn._gn_whole_kernel, dict(flags, BLOCK_P=64, BLOCK_C=64, BLOCK_G=8)).asm.get("cubin"))
    built += bool(build(tn._gn_stats_kernel, dict(HAS_X2=True, HAS_ADD=True, BLOCK_P=32, BLOCK_C=128)).asm.get("cubin"))
    built += bool(build(tn._gn_finalize_kernel, dict(BLOCK_S=16, BLOCK_G=32, BLOCK_CG=4)).asm.get("cubin"))
    # over a conv's row statistics, the time embedding's addend shifting the means (diffquant::group_norm_act_stats)
    built += bool(build(tn._gn_finalize_kernel, dict(BLOCK_S=64, BLOCK_G=8, BLOCK_CG=16, SHIFT=True)).asm.get("cubin"))
    # one group a program: the finalize at small batch, and the one-launch kernel with gpp=1
    built += bool(build(tn._gn_finalize_kernel, dict(BLOCK_S=128, BLOCK_G=1, BLOCK_CG=16)).asm.get("cubin"))
    built += bool(build(tn._gn_whole_kernel, dict(HAS_X2=False, HAS_ADD=True, SILU=True, QUANT=True, INT8=False,
                                                   SCALE_PER_CH=False, RAW=False, RAW_INT8=False, RAW_PER_CH=False,
                                                   EMULATE=False, BLOCK_P=256, BLOCK_C=16, BLOCK_G=2)).asm.get("cubin"))
    # LOAD_STAGES: by default each loop's loads are plain (synchronous) vector loads; with 3, asynchronous copies
    # through shared memory, the next tiles' issued while this one is reduced
    apply_flags = dict(HAS_X2=False, HAS_ADD=True, SILU=True, QUANT=True, INT8=False, SCALE_PER_CH=False, RAW=False,
                       RAW_INT8=False, RAW_PER_CH=False, EMULATE=False, PURE=False, BLOCK_P=32, BLOCK_C=128)
    for fn, consts in ((tn._gn_stats_kernel, dict(HAS_X2=False, HAS_ADD=True, PURE=False, BLOCK_P=32, BLOCK_C=128)),
                       (tn._gn_apply_kernel, apply_flags)):
        plain, piped = build(fn, consts), build(fn, dict(consts, LOAD_STAGES=3))
        assert "async_copy_global_to_local" not in plain.asm["ttgir"], fn.__name__
        assert "async_copy_global_to_local" in piped.asm["ttgir"] and "cp.async" in piped.asm["ptx"], fn.__name__
        built += 2
    # the finalize folded into apply (SD-1.5's 320-channel norm: 64-channel chunks touch up to 8 groups of 10)
    built += bool(build(tn._gn_apply_kernel, dict(apply_flags, BLOCK_C=64, FOLD=True, FBLOCK_S=16, FBLOCK_G=8,
                                                  FBLOCK_CG=16)).asm.get("cubin"))
    assert built == 22


def test_add_layer_norm_kernel_compiles_for_hopper():
    """diffquant::add_layer_norm's kernel compiles for sm_90 (Triton's own ptxas, no GPU) in the flag combinations
    the op launches: with and without the projection's scale / bias and the residual, e4m3 output with one or
    per-channel scales, 16-bit output, two column chunks or one padded one. With a scale, its multiply stays a
    ``mul.rn`` (not contracted into an FMA with the bias add: the eager model rounds the product on its own)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if str(ROOT / "src") not in sys.path:
        sys.path.insert(0, str(ROOT / "src"))
    from diffquant.kernels import triton_layernorm as tl_mod

    fn = tl_mod._add_ln_kernel
    built = 0
    for ys, yb, r, quant, per_ch, (c1, c2, mask) in [(True, True, True, True, False, (256, 64, False)),
                                                     (False, False, True, True, True, (512, 128, False)),
                                                     (True, True, False, True, False, (1024, 256, False)),
                                                     (False, False, False, False, False, (128, 0, True))]:
        consts = dict(HAS_YS=ys, HAS_YB=yb, HAS_R=r, HAS_W=True, HAS_B=True, WRITE_H=ys or yb or r, QUANT=quant,
                      OS_PER_CH=per_ch, EMULATE=False, C1=c1, C2=c2, MASK_C=mask, BLOCK_M=8)
        types = {"y_ptr": "*bf16", "ys_ptr": "*fp32", "yb_ptr": "*fp32", "r_ptr": "*bf16", "w_ptr": "*bf16",
                 "b_ptr": "*bf16", "os_ptr": "*fp32", "h_ptr": "*bf16", "o_ptr": "*u8" if quant else "*bf16",
                 "T": "i32", "C": "i32", "sy": "i32", "sr": "i32", "inv_c": "fp32", "eps": "fp32"}
        sig = {n: "constexpr" if n in consts else types[n] for n in fn.arg_names}
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": 4})
        assert k.asm.get("cubin") and (("mul.rn.f32" in k.asm["ptx"]) == ys), consts
        built += 1
    assert built == 4


def test_attention_and_conv_kernels_compile_for_hopper():
    """The FP8 attention kernel (V handed over keys-contiguous; head dims 40 and 160 padded to 64 and 256; e4m3 or
    bf16 output), the conv kernels (gather, TMA over a padded copy, 4-D TMA, its persistent form, its
    one-dot-per-row form, whose A tiles stay in shared memory, its split-K pair, and conv2 with its shortcut in one
    accumulator; FP8, and int8 with a zero point and the padding fix-up) and the GEGLU GEMM (and its persistent form) compile for sm_90
    without a GPU; some with DIFFQUANT_FP8_ACC=precise's promoted FP8 accumulation."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if str(ROOT / "src") not in sys.path:
        sys.path.insert(0, str(ROOT / "src"))
    from diffquant.kernels import triton_attention as ta
    from diffquant.kernels import triton_conv as tc
    from diffquant.kernels import triton_conv_tma as tt

    def build(fn, consts, types, warps=4, stages=3):
        # constexprs with a default (the FP8 accumulation knobs) take it unless given
        consts = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}, **consts}
        sig = {n: "constexpr" if n in consts else types(n) for n in fn.arg_names}
        src = ASTSource(fn=fn, signature=sig, constexprs=consts)
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps,
                                                                              "num_stages": stages})

    def attn_type(n):
        if n in ("q_ptr", "k_ptr", "v_ptr"):
            return "*u8"
        if n in ("sq_ptr", "sk_ptr", "sv_ptr", "so_ptr"):
            return "*fp32"
        return "fp32" if n == "sm_scale" else "i32"

    built = 0
    # the second: DIFFQUANT_FP8_ACC=precise (each dot's FP8 products promoted into the fp32 accumulator)
    for d, bd, bm, quant, acc in ((40, 64, 128, False, None), (160, 256, 64, True, 64)):
        types = lambda n: ("*u8" if quant else "*bf16") if n == "o_ptr" else attn_type(n)  # noqa: E731
        k = build(ta._fp8_attn_kernel, dict(D=d, BLOCK_M=bm, BLOCK_N=64, BLOCK_D=bd, EMULATE=False, QUANT_OUT=quant,
                                                 EVEN_K=not quant, ACC_QK=acc, ACC_PV=acc and 32),
                  types, warps=8 if bm * bd >= 128 * 128 else 4, stages=3 if bd <= 128 else 2)
        built += bool(k.asm.get("cubin"))

    for fp8 in (True, False):
        def conv_type(n, fp8=fp8):
            if n in ("x_ptr", "w_ptr"):
                return "*u8" if fp8 else "*i8"  # FP8 travels as its bytes
            if n in ("out_ptr", "add_ptr"):
                return "*bf16"
            if n in ("ascale_ptr", "wscale_ptr", "bias_ptr"):
                return "*fp32"
            return "*i32" if n.endswith("_ptr") else "i32"

        consts = dict(KH=3, KW=3, A_INT=not fp8, A_FP8=fp8, W4=False, HAS_AZP=False, PAD_FIX=not fp8, HAS_ASCALE=True,
                      HAS_WZP=False, HAS_CORR=not fp8, HAS_BIAS=True, HAS_ADD=True, BLOCK_M=128, BLOCK_N=128,
                      BLOCK_K=64, GROUP_M=8, EVEN_K=True, IEEE=False)
        built += bool(build(tc._qconv_kernel, consts, conv_type, warps=8).asm.get("cubin"))

        def tma_type(n, fp8=fp8, a_box="1, 8, 16, 64"):  # host tensor descriptors (e4m3 on the GPU, not bitcast)
            el = "fp8e4nv" if fp8 else "i8"
            if n == "a_desc":
                return f"tensordesc<{el}[{a_box}]>"
            if n == "b_desc":
                return f"tensordesc<{el}[128, 64]>"
            return conv_type(n)

        common = dict(KW=3, A_INT=not fp8, BITCAST_FP8=False, HAS_ASCALE=True, HAS_CORR=not fp8, HAS_BIAS=True,
                      HAS_ADD=True, BLOCK_N=128, BLOCK_K=64, GROUP_M=8)
        built += bool(build(tt._qconv_tma4d_kernel, dict(common, KH=3, PAD_FIX=not fp8, BI=1, BH=8, BW=16), tma_type,
                            warps=8, stages=4).asm.get("cubin"))
        # one-row tiles ([1, 1, BW, BK] boxes: A from shared memory), with precise FP8 accumulation where FP8
        built += bool(build(tt._qconv_tma4d_kernel, dict(common, KH=3, PAD_FIX=not fp8, BI=1, BH=1, BW=128,
                                                          FP8_ACC=32 if fp8 else None),
                            lambda n, f=tma_type: f(n, a_box="1, 1, 128, 64"), warps=8, stages=4).asm.get("cubin"))
        # one dot per row (tma4dr): 4 rows of 64, each a one-row box read by the MMA from shared memory (so precise
        # FP8 accumulation compiles too), where the plain kernel reshapes a [1, 4, 64, BK] box in registers
        k = build(tt._qconv_tma4d_rows_kernel, dict(common, KH=3, PAD_FIX=not fp8, BI=1, BH=4, BW=64,
                                                    FP8_ACC=32 if fp8 else None),
                  lambda n, f=tma_type: f(n, a_box="1, 1, 64, 64"), warps=8, stages=4)
        built += bool(k.asm.get("cubin"))
        assert "ttg.local_load" not in k.asm["ttgir"]
        # wide tiles: 256 + 64 output channels a program (two B descriptors, two accumulators), as SD's 320 channels
        wide_type = lambda n, f=tma_type: ("tensordesc<{}[64, 64]>".format("fp8e4nv" if fp8 else "i8")  # noqa: E731
                                           if n == "b2_desc" else f(n, a_box="1, 2, 64, 64") if n != "b_desc"
                                           else "tensordesc<{}[256, 64]>".format("fp8e4nv" if fp8 else "i8"))
        k = build(tt._qconv_tma4d_wide_kernel, dict(common, KH=3, PAD_FIX=not fp8, BI=1, BH=2, BW=64, BLOCK_N=256,
                                                     BLOCK_N2=64), wide_type, warps=8, stages=4)
        built += bool(k.asm.get("cubin"))
        if fp8:  # conv2 with its two-part 1x1 shortcut in one accumulator (diffquant::qconv_sc; FP8 only)
            sc_type = lambda n, f=tma_type: ("tensordesc<fp8e4nv[1, 2, 64, 64]>" if n in ("a_desc", "a1_desc",  # noqa: E731
                                                                                      "a2_desc")
                                              else "tensordesc<fp8e4nv[128, 64]>" if n in ("b_desc", "b1_desc",
                                                                                         "b2_desc")
                                              else "*fp32" if n.startswith(("as", "ws", "scbias")) else f(n))
            k = build(tt._qconv_tma4d_sc_kernel, dict(KW=3, KSC=1, BITCAST_FP8=False, HAS_BIAS=True, HAS_SC_BIAS=True,
                                                      NSC=2, BI=1, BH=2,
                                                      BW=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8), sc_type, warps=4,
                      stages=3)
            built += bool(k.asm.get("cubin"))
            # and with wide tiles (128 + 32 output channels a program: SD's 320 as two programs)
            wide_sc = lambda n, f=sc_type: ("tensordesc<fp8e4nv[32, 64]>" if n in ("bw_desc", "b1w_desc",  # noqa: E731
                                                                                  "b2w_desc") else f(n))
            k = build(tt._qconv_tma4d_sc_wide_kernel, dict(KW=3, KSC=1, BITCAST_FP8=False, HAS_BIAS=True,
                                                           HAS_SC_BIAS=True, NSC=2, BI=1, BH=2, BW=64, BLOCK_N=128,
                                                           BLOCK_N2=32, BLOCK_K=64, GROUP_M=8), wide_sc, warps=4,
                      stages=3)
            built += bool(k.asm.get("cubin"))
            # a split 3x3 conv (an up block's conv1 on (h, skip)): its second part as one 3x3 source, wide tiles
            k = build(tt._qconv_tma4d_sc_wide_kernel, dict(KW=3, KSC=3, BITCAST_FP8=False, HAS_BIAS=True,
                                                           HAS_SC_BIAS=False, NSC=1, BI=1, BH=2, BW=64, BLOCK_N=128,
                                                           BLOCK_N2=32, BLOCK_K=64, GROUP_M=8), wide_sc, warps=4,
                      stages=3)
            built += bool(k.asm.get("cubin"))
        # the persistent form, its tile loop flattened into the tap loop (software-pipelined across tiles)
        built += bool(build(tt._qconv_tma4d_persistent_kernel, dict(common, KH=3, PAD_FIX=not fp8, BI=1, BH=8, BW=16,
                                                                     FLATTEN=True), tma_type,
                            warps=8, stages=4).asm.get("cubin"))
        # the row-statistics epilogue (diffquant::qconv_stats): 8-row tiles, and two 8x8 images a tile; its
        # reductions by warp shuffles, and on the tensor cores (TF32 dots)
        for box, dot in (((1, 8, 16), False), ((2, 8, 8), False), ((1, 8, 16), True)):
            stats_type = lambda n, f=tma_type, b=box: "*fp32" if n in ("mean_ptr", "m2_ptr") else f(  # noqa: E731
                n, a_box=", ".join(map(str, (*b, 64))))
            built += bool(build(tt._qconv_tma4d_kernel, dict(common, KH=3, PAD_FIX=not fp8, BI=box[0], BH=box[1],
                                                              BW=box[2], STATS=True, STATS_DOT=dot), stats_type,
                                warps=8, stages=4).asm.get("cubin"))
        built += bool(build(tt._qconv_tma_kernel, dict(common, BLOCK_M=128),
                            lambda n, f=tma_type: f(n, a_box="128, 64"), warps=8, stages=4).asm.get("cubin"))
        # split-K: the partial tiles into an fp32 (int32) workspace, and the kernel that sums them into the epilogue
        ws_type = "*fp32" if fp8 else "*i32"
        split = {k: common[k] for k in ("KW", "A_INT", "BITCAST_FP8", "BLOCK_N", "BLOCK_K", "GROUP_M")}
        built += bool(build(tt._qconv_tma4d_splitk_kernel, dict(split, BI=2, BH=8, BW=8),
                            lambda n, f=tma_type: ws_type if n == "ws_ptr" else f(n, a_box="2, 8, 8, 64"), warps=8,
                            stages=4).asm.get("cubin"))
        built += bool(build(tt._qconv_tma_splitk_kernel, dict(split, BLOCK_M=64),
                            lambda n, f=tma_type: ws_type if n == "ws_ptr" else f(n, a_box="64, 64"), warps=4,
                            stages=4).asm.get("cubin"))
        for padded in (False, True):
            built += bool(build(tt._qconv_splitk_reduce_kernel, dict(
                KH=3, KW=3, PAD_FIX=not fp8 and not padded, HAS_ASCALE=True, HAS_CORR=not fp8, HAS_BIAS=True,
                HAS_ADD=True, PADDED=padded, BI=2, BH=8, BW=8, RM=32, RN=128),
                lambda n: ws_type if n == "ws_ptr" else conv_type(n)).asm.get("cubin"))
    from diffquant.kernels import triton_geglu as tg

    def geglu_type(n, bm=128, bn=128):
        if n == "a_desc":
            return f"tensordesc<fp8e4nv[{bm}, 128]>"
        if n == "w_desc":
            return f"tensordesc<fp8e4nv[{bn}, 128]>"
        if n == "out_ptr":
            return "*u8"
        return "*fp32" if n.endswith("_ptr") else "i32"

    built += bool(build(tg._linear_geglu_kernel, dict(HAS_BIAS=True, QUANT=True, OSCALE_PER_CH=False, BITCAST_FP8=False,
                                                       EMULATE=False, BLOCK_M=128, BLOCK_N=64, BLOCK_K=128,
                                                       GROUP_M=8), lambda n: geglu_type(n, 128, 64),
                        warps=4, stages=2).asm.get("cubin"))  # pick_geglu_config's default
    built += bool(build(tg._linear_geglu_persistent_kernel, dict(
        HAS_BIAS=True, QUANT=True, OSCALE_PER_CH=False, BITCAST_FP8=False, EMULATE=False, BLOCK_M=128, BLOCK_N=128,
        BLOCK_K=128, GROUP_M=8, FLATTEN=True, FP8_ACC=64), geglu_type, warps=8, stages=3).asm.get("cubin"))
    assert built == 35


def test_fp8_accumulation_knob_and_its_routing(monkeypatch):
    """DIFFQUANT_FP8_ACC: "fast" (Triton's default on sm_90, no promotion) gives no max_num_imprecise_acc; "precise"
    promotes every 64 products (32 in a dot of 64; none possible in a dot of 32), FP8 only; a bad value is refused.
    Under "precise" an FP8 call whose 4-D TMA tile spans several rows (A reshaped in registers: Triton cannot
    promote there) takes the one-dot-per-row kernel where rows are 64 pixels or wider, else the padded 2-D TMA
    kernel; one-row tiles, int8 and the default mode keep their kernel.
    The interpreter's GEGLU and attention kernels still match their references under "precise"."""
    if str(ROOT / "src") not in sys.path:
        sys.path.insert(0, str(ROOT / "src"))
    from diffquant.kernels._triton_common import fp8_acc
    from diffquant.kernels.triton_conv import precise_path

    monkeypatch.delenv("DIFFQUANT_FP8_ACC", raising=False)
    assert fp8_acc(128) is None and precise_path("tma4d", 128, 32, 32, True) == "tma4d"
    monkeypatch.setenv("DIFFQUANT_FP8_ACC", "precise")
    assert (fp8_acc(256), fp8_acc(128), fp8_acc(64), fp8_acc(32), fp8_acc(128, fp8=False)) == (64, 64, 32, None, None)
    assert precise_path("tma4d", 128, 32, 32, True) == "tma"  # 4 rows of 32
    assert precise_path("tma4d", 128, 64, 64, True) == "tma4dr"  # 2 rows of 64: one-row boxes, one dot per row
    assert precise_path("tma4dp", 256, 64, 64, True) == "tma4dr"
    assert precise_path("tma4d", 128, 40, 40, True) == "tma"  # 64-wide boxes over 40-pixel rows: not offered
    assert precise_path("tma4dp", 128, 8, 8, True) == "tma"  # 2 images of 8 x 8
    assert precise_path("tma4d", 64, 64, 64, True) == "tma4d"  # one row of 64
    assert precise_path("tma4d", 128, 32, 32, False) == "tma4d"  # int8
    assert precise_path("gather", 128, 32, 32, True) == "gather"
    monkeypatch.setenv("DIFFQUANT_FP8_ACC", "exact")
    with pytest.raises(ValueError, match="allowed"):
        fp8_acc(128)
    env = dict(os.environ, TRITON_INTERPRET="1", DIFFQUANT_FP8_ACC="precise")
    for finite, err, kind in _run_script(GEGLU_SCRIPT.format(src=str(ROOT / "src")), env):
        assert finite and err < {"codes": 5e-3, "bf16": 1e-2}[kind], (kind, err)
    for finite, rel in _run_script(ATTN_SCRIPT.format(src=str(ROOT / "src")), env):
        assert finite and rel < 1e-5, rel


def test_geglu_config_environment_override(monkeypatch):
    """DIFFQUANT_GEGLU_CONFIG (JSON) overrides pick_geglu_config's keys for calls without an explicit config (the
    in-model A/B of GEGLU configs), reaches the launch, and is refused when it is not JSON or names unknown keys."""
    if str(ROOT / "src") not in sys.path:
        sys.path.insert(0, str(ROOT / "src"))
    import torch

    import diffquant.kernels.triton_geglu as tg

    monkeypatch.delenv("DIFFQUANT_GEGLU_CONFIG", raising=False)
    base = tg.pick_geglu_config(32768, 1280, 320)
    assert tg.geglu_config(32768, 1280, 320) == base and not base.get("persistent")
    monkeypatch.setenv("DIFFQUANT_GEGLU_CONFIG", '{"BLOCK_M": 128, "num_warps": 8, "persistent": true}')
    assert tg.geglu_config(32768, 1280, 320) == dict(base, BLOCK_M=128, num_warps=8, persistent=True)

    class Launched(Exception):
        pass

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                raise Launched((grid, kw["BLOCK_M"], kw["num_warps"]))
            return launch

    monkeypatch.setattr(tg, "_linear_geglu_persistent_kernel", Spy())
    xq = torch.zeros(40, 32).to(torch.float8_e4m3fn)
    wq = torch.zeros(2 * 16, 32).to(torch.float8_e4m3fn)
    one = torch.ones(1)
    with pytest.raises(Launched) as e:
        tg.linear_geglu_triton(xq, wq, torch.ones(32), one, None, one, torch.float8_e4m3fn)
    assert e.value.args[0][1:] == (128, 8)
    for bad, msg in (("{BLOCK_M: 64}", "not JSON"), ('{"BLOCK": 64}', "keys among"), ("[64]", "keys among")):
        monkeypatch.setenv("DIFFQUANT_GEGLU_CONFIG", bad)
        with pytest.raises(ValueError, match=msg):
            tg.geglu_config(64, 64, 64)


def test_tma4d_launch_retries_with_fewer_stages_when_shared_memory_runs_out(monkeypatch):
    """A 4-D TMA conv launch (plain, rows or persistent) that runs out of shared memory is retried with one stage
    fewer, down to one; another OutOfResources (registers), or one at a single stage, is raised."""
    if str(ROOT / "src") not in sys.path:
        sys.path.insert(0, str(ROOT / "src"))
    import torch
    import triton

    import diffquant.kernels.triton_conv_tma as tt

    def fake(limit, what="shared memory"):
        seen = []

        class K:
            def __getitem__(self, grid):
                def launch(*a, **kw):
                    seen.append(kw["num_stages"])
                    if kw["num_stages"] > limit:
                        raise triton.runtime.errors.OutOfResources(262192, 232448, what)
                return launch
        return K(), seen

    x = torch.zeros(1, 32, 4, 64).to(torch.float8_e4m3fn).contiguous(memory_format=torch.channels_last)
    w = torch.zeros(16, 3, 3, 32).to(torch.float8_e4m3fn)
    ws, sa = torch.ones(16), torch.ones(1)
    cfg = dict(BLOCK_M=128, BLOCK_N=16, BLOCK_K=32, num_warps=4, num_stages=4)
    for name, kw in (("_qconv_tma4d_rows_kernel", dict(rows=True)), ("_qconv_tma4d_kernel", {}),
                     ("_qconv_tma4d_persistent_kernel", dict(persistent=True))):
        k, seen = fake(2)
        monkeypatch.setattr(tt, name, k)
        tt.qconv_tma4d(x, w, ws, sa, None, None, None, 0, (1, 1), torch.bfloat16, config=cfg, **kw)
        assert seen == [4, 3, 2], (name, seen)
        k, seen = fake(0)
        monkeypatch.setattr(tt, name, k)
        with pytest.raises(triton.runtime.errors.OutOfResources):
            tt.qconv_tma4d(x, w, ws, sa, None, None, None, 0, (1, 1), torch.bfloat16, config=cfg, **kw)
        assert seen == [4, 3, 2, 1]
        k, seen = fake(2, "registers")
        monkeypatch.setattr(tt, name, k)
        with pytest.raises(triton.runtime.errors.OutOfResources):
            tt.qconv_tma4d(x, w, ws, sa, None, None, None, 0, (1, 1), torch.bfloat16, config=cfg, **kw)
        assert seen == [4]


def test_norm_load_stages_knob(monkeypatch):
    """DIFFQUANT_GN_LOAD_STAGES: the norm plans' tiles in flight (default 1: plain loads), an explicit value over
    the environment's, anything but 1-4 refused."""
    if str(ROOT / "src") not in sys.path:
        sys.path.insert(0, str(ROOT / "src"))
    import torch

    from diffquant.kernels.triton_norm import load_stages, norm_plan, whole_plan

    monkeypatch.delenv("DIFFQUANT_GN_LOAD_STAGES", raising=False)
    cpu = torch.device("cpu")
    assert load_stages() == 1 and norm_plan(8, 320, 4096, cpu)["stages"] == 1
    monkeypatch.setenv("DIFFQUANT_GN_LOAD_STAGES", "3")
    assert norm_plan(8, 320, 4096, cpu)["stages"] == 3 and whole_plan(320, 64, 32)["stages"] == 3
    assert norm_plan(8, 320, 4096, cpu, stages=2)["stages"] == 2
    for bad in ("three", "0", "5"):
        monkeypatch.setenv("DIFFQUANT_GN_LOAD_STAGES", bad)
        with pytest.raises(ValueError, match="1 to 4|integer from 1 to 4"):
            load_stages()


def test_split_k_switch_splits_table_configs_of_layers_with_few_tiles(monkeypatch):
    """DIFFQUANT_QCONV_SPLIT_K=S (an in-model A/B): a table's tma / tma4d config gets SPLIT_K=S where the layer has
    fewer output tiles than SPLIT_K_BELOW_TILES; gather configs, configs with their own SPLIT_K, layers with many
    tiles and the tuner's forced configs are left alone; a bad value is refused."""
    if str(ROOT / "src") not in sys.path:
        sys.path.insert(0, str(ROOT / "src"))
    import torch

    from diffquant.kernels import triton_conv as tc
    from diffquant.kernels import tuning

    class X:  # what _config reads of the activation: its device and element size
        device = torch.device("cuda")

        def element_size(self):
            return 1

    entry = {}
    monkeypatch.setattr(tc, "_device_name", lambda dev: "GPU-A")
    monkeypatch.setattr(tuning, "lookup", lambda key, dev: dict(entry["cfg"]) if entry.get("cfg") else None)
    base = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=4)
    ok = frozenset({"tma", "tma4d", "tma4dp"})

    def cfg_for(cfg, m=512, cout=1280):
        entry["cfg"] = cfg
        return tc._config(X(), "k", m, cout, 1280, False, ok)

    monkeypatch.delenv("DIFFQUANT_QCONV_SPLIT_K", raising=False)
    assert cfg_for(dict(base, path="tma4d")) == dict(base, path="tma4d")
    monkeypatch.setenv("DIFFQUANT_QCONV_SPLIT_K", "3")
    assert cfg_for(dict(base, path="tma4d")) == dict(base, path="tma4d", SPLIT_K=3)  # 4 x 10 tiles
    assert cfg_for(dict(base, path="tma")) == dict(base, path="tma", SPLIT_K=3)
    assert cfg_for(dict(base, path="tma4d"), m=32768) == dict(base, path="tma4d")  # 256 x 10 tiles
    assert cfg_for(dict(base, path="tma4dp")) == dict(base, path="tma4dp")
    assert cfg_for(dict(base, path="tma4d", SPLIT_K=2)) == dict(base, path="tma4d", SPLIT_K=2)
    assert "SPLIT_K" not in cfg_for(dict(base))  # gather
    with tuning.forced_config(dict(base, path="tma4d")):
        assert cfg_for(dict(base, path="tma4d")) == dict(base, path="tma4d")
    monkeypatch.setenv("DIFFQUANT_QCONV_SPLIT_K", "two")
    with pytest.raises(ValueError, match="DIFFQUANT_QCONV_SPLIT_K"):
        cfg_for(dict(base, path="tma4d"))


STATS_SCRIPT = r'''
import json, sys
sys.path.insert(0, {tests!r}); sys.path.insert(0, {src!r})
import torch
_empty = torch.empty
def poisoned_empty(*a, **k):  # every float buffer starts as NaN: a statistic the kernels do not write fails
    t = _empty(*a, **k)
    return t.fill_(float("nan")) if t.is_floating_point() and t.dtype != torch.float8_e4m3fn else t
torch.empty = poisoned_empty
import diffquant.kernels.reference as ref_mod
from diffquant.kernels import qconv_ref, tuning
from diffquant.kernels.reference import row_stats_reference, group_norm_act_stats_reference
from diffquant.kernels.triton_conv import qconv_triton
import diffquant.kernels.triton_conv_tma as tt
from diffquant.kernels.triton_norm import group_norm_act_stats_triton
import test_kernels as tk
real = tt._qconv_tma4d_kernel
class Spy:  # records whether the 4-D kernel ran with its statistics epilogue
    def __getitem__(self, grid):
        def launch(*a, **k):
            epilogue.append(bool(k.get("STATS", False)))
            return real[grid](*a, **k)
        return launch
tt._qconv_tma4d_kernel = Spy()
res = []
for kind, kw, with_add, path, bm in json.loads({cases!r}):
    epilogue = []
    c = tk._rand_case(kind, **kw)
    ho, wo = kw["h"], kw["w"]  # 3x3, padding 1
    if with_add:
        c["add"] = torch.randn(kw["n"], kw["cout"], ho, wo).contiguous(memory_format=torch.channels_last)
    cfg = dict(BLOCK_M=bm, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2, path=path)
    with tuning.forced_config(cfg):
        out, mean, m2 = tk._call(lambda *a, **k: qconv_triton(*a, **k, stats=True), c, 1, 1)
    want = tk._call(qconv_ref, c, 1, 1).float()
    wm, wq = row_stats_reference(out)
    rel = lambda a, b: float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))
    # the norm that takes them: bf16 output and e4m3 output with a time-embedding addend
    g = 8
    wt, bs = torch.randn(kw["cout"]), torch.randn(kw["cout"])
    add = torch.randn(kw["n"], kw["cout"])
    n_bf = group_norm_act_stats_triton(out, mean, m2, add, wt, bs, g, 1e-5, True, None, torch.bfloat16)
    r_bf = group_norm_act_stats_reference(out, wm, wq, add, wt, bs, g, 1e-5, True, None, torch.bfloat16)
    so = torch.tensor([0.01])
    n_q = group_norm_act_stats_triton(out, mean, m2, add, wt, bs, g, 1e-5, True, so, torch.float8_e4m3fn)
    r_q = group_norm_act_stats_reference(out, wm, wq, add, wt, bs, g, 1e-5, True, so, torch.float8_e4m3fn)
    res.append([rel(out.float(), want), rel(mean, wm), rel(m2, wq), bool(torch.isfinite(mean).all() and
                torch.isfinite(m2).all()), epilogue, rel(n_bf.float(), r_bf.float()),
                float((n_q.float() != r_q.float()).float().mean())])
print("RESULT" + json.dumps(res))
'''

STATS_CASES = [  # (kind, case, residual add, forced path, BLOCK_M)
    ("fp8", dict(n=2, cin=48, cout=40, h=9, w=3), True, "tma4d", 32),  # 8-row tiles, a partial second one
    ("int8", dict(n=3, cin=32, cout=24, h=4, w=4, a_zp=3), False, "tma4d", 32),  # 2 images a tile, padding fix
    ("fp8", dict(n=1, cin=32, cout=16, h=5, w=40), False, "tma4d", 32),  # rows wider than a tile: stats pass
    ("fp8", dict(n=2, cin=48, cout=40, h=7, w=6), True, "gather", 32),  # another kernel: stats pass
]


@pytest.mark.parametrize("epilogue", ["shuffle", "dot"])
def test_interpreter_conv_row_stats_feed_the_norm(epilogue):
    """``stats=True`` (``diffquant::qconv_stats``): the 4-D kernel's epilogue writes each (image, output row,
    channel)'s mean and sum of squared deviations of the stored output where its tiles hold whole rows (8-row tiles
    with a partial last one; two images a tile, int8 with the padding fix-up); other configs (rows wider than the
    tile, the gather kernel) run the statistics kernel with one segment per row. NaN-poisoned buffers catch an
    unwritten statistic; a spy checks which form ran. Then ``group_norm_act_stats``'s kernels (finalize over the rows'
    partials plus the time-embedding addend, apply) against the reference, bf16 and e4m3 out. Both epilogue forms
    (``DIFFQUANT_GN_STATS_EPILOGUE``: warp-shuffle reductions, or sums on the tensor cores)."""
    env = dict(os.environ, TRITON_INTERPRET="1", DIFFQUANT_QCONV_TMA="0", DIFFQUANT_GN_STATS_EPILOGUE=epilogue)
    code = STATS_SCRIPT.format(tests=str(ROOT / "tests"), src=str(ROOT / "src"), cases=json.dumps(STATS_CASES))
    res = _run_script(code, env)
    for case, (out_rel, mean_rel, m2_rel, finite, epilogue, norm_rel, codes_off) in zip(STATS_CASES, res):
        assert out_rel < 1e-5 and finite, (case, out_rel)
        assert mean_rel < 1e-5 and m2_rel < 1e-4, (case, mean_rel, m2_rel)
        assert epilogue == ([True] if case[3] == "tma4d" and case[1]["w"] <= 8 else
                            [False] if case[3] == "tma4d" else []), (case, epilogue)
        assert norm_rel < 1e-2 and codes_off < 0.01, (case, norm_rel, codes_off)


def test_conv_kernels_keep_the_wgmma_pipeline_without_a_residual():
    """The conv kernels' K loops tell the compiler that they are never empty (``tl.assume``). Without it LLVM lays out
    a zero-trip path that defines the accumulators after the loop; ptxas then sees non-wgmma instructions defining
    accumulator registers inside the pipeline stage (its warning C7515) and waits for every wgmma at once. That hit
    the kernels without a residual add (8 of the 28 SD-1.5 b8 conv entries of the H200 table; session 21,
    ``python benchmarks/ptxas_report.py --table-census``), e.g. the ResNet blocks' conv1: in the model's Nsight Compute
    probe the 32x32 conv1 kept the tensor pipe 56 % busy against 75 % for conv2 with the same kernel and config.
    Compiled for sm_90 without a GPU, as a launch specializes the arguments; the SASS must wait for all wgmmas once,
    after the loop, not after each."""
    import re
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if str(ROOT / "src") not in sys.path:
        sys.path.insert(0, str(ROOT / "src"))
    from diffquant.kernels import triton_conv_tma as tt

    bindir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"

    def sass(fn, consts, boxes, warps, stages):
        consts = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}, **consts}
        consts = {k: v for k, v in consts.items() if k in fn.arg_names}

        def types(n):
            if n.endswith("_desc"):
                return f"tensordesc<fp8e4nv[{boxes[n]}]>"
            return "*bf16" if n in ("out_ptr", "add_ptr") else "*fp32" if n.endswith("_ptr") else "i32"

        sig = {n: "constexpr" if n in consts else types(n) for n in fn.arg_names}
        div = ("Cout", "CK", "son", "soh", "sow", "san", "sah", "saw")
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
                 if n not in consts and (n.endswith("_ptr") or n in div)}
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            return subprocess.run([str(bindir / "nvdisasm"), "-c", f.name], capture_output=True, text=True,
                                  check=True).stdout

    base = dict(KH=3, KW=3, A_INT=False, BITCAST_FP8=False, PAD_FIX=False, HAS_ASCALE=True, HAS_CORR=False,
                HAS_BIAS=True, soc=1, sac=1, GROUP_M=8, BLOCK_K=128)
    cases = [  # the SD-1.5 b8 table's conv1 of the 32x32 level (wide tiles), 16x16 (wide) and 64x64 (640 channels)
        (tt._qconv_tma4d_wide_kernel, dict(BI=1, BH=4, BW=32, BLOCK_N=128, BLOCK_N2=32), "1, 4, 32, 128", 4, 3),
        (tt._qconv_tma4d_wide_kernel, dict(BI=1, BH=4, BW=16, BLOCK_N=128, BLOCK_N2=32), "1, 4, 16, 128", 4, 4),
        (tt._qconv_tma4d_kernel, dict(BI=1, BH=2, BW=64, BLOCK_N=128), "1, 2, 64, 128", 4, 3),
    ]
    for fn, consts, a_box, warps, stages in cases:
        for add in (False, True):
            s = sass(fn, dict(base, **consts, HAS_ADD=add),
                     {"a_desc": a_box, "b_desc": "128, 128", "b2_desc": f"{consts.get('BLOCK_N2', 0)}, 128"},
                     warps, stages)
            wgmmas = len(re.findall(r"\bQGMMA\.", s))
            waits_all = s.count("WARPGROUP.DEPBAR.LE gsb0, 0x0")
            assert wgmmas >= 8 and waits_all == 1, (fn.__name__, consts, add, wgmmas, waits_all)
    # conv2 with its shortcut (chained loops, the accumulators rescaled between sources) stays pipelined because its
    # loops go without the hint: with it, ptxas serializes every wgmma there (48 of 48 at the 64x64 level)
    sc = dict(KW=3, KSC=1, BITCAST_FP8=False, HAS_BIAS=True, HAS_SC_BIAS=True, NSC=2, BI=1, BH=2, BW=64, BLOCK_N=128,
              BLOCK_N2=32, BLOCK_K=128, GROUP_M=8, soc=1)
    s = sass(tt._qconv_tma4d_sc_wide_kernel, sc, {**{f"a{i}_desc": "1, 2, 64, 128" for i in ("", "1", "2")},
                                                 **{f"b{i}_desc": "128, 128" for i in ("", "1", "2")},
                                                 **{f"b{i}w_desc": "32, 128" for i in ("", "1", "2")}}, 4, 3)
    wgmmas, waits_all = len(re.findall(r"\bQGMMA\.", s)), s.count("WARPGROUP.DEPBAR.LE gsb0, 0x0")
    assert wgmmas >= 32 and waits_all <= 3, (wgmmas, waits_all)


def test_kernels_refuse_an_empty_k_loop():
    """The K loops assume at least one step (:func:`diffquant.kernels._triton_common.nonempty`), so the hosts refuse
    what would launch none: a conv weight without input channels, a GEGLU input of width 0. Checked before any launch
    (CPU tensors)."""
    if str(ROOT / "src") not in sys.path:
        sys.path.insert(0, str(ROOT / "src"))
    import torch

    from diffquant.kernels.triton_conv import qconv_triton
    from diffquant.kernels.triton_geglu import linear_geglu_triton

    x = torch.zeros(1, 0, 4, 4).to(torch.float8_e4m3fn)
    w = torch.zeros(8, 3, 3, 0).to(torch.float8_e4m3fn)  # [cout, kh, kw, cin]
    with pytest.raises(ValueError, match="no input channels"):
        qconv_triton(x, w, torch.ones(8), torch.ones(1), None, None, None, None, 0, (1, 1), (1, 1), (1, 1), False,
                     torch.bfloat16)
    with pytest.raises(ValueError, match="positive multiple of 16"):
        linear_geglu_triton(torch.zeros(4, 0).to(torch.float8_e4m3fn), torch.zeros(32, 0).to(torch.float8_e4m3fn),
                            torch.ones(32), torch.ones(1), None, None, torch.bfloat16)
