"""Cross-check diffquant's Q-Diffusion quantizer math against the reference implementation.

The reference (Xiuyu-Li/q-diffusion, built on yhhhli/BRECQ) is *not* part of diffquant and is never
copied into it: this script imports its ``qdiff/quant_layer.py``, ``qdiff/adaptive_rounding.py`` and
(optionally) ``qdiff/block_recon.py`` at run time from a directory given with ``--ref`` and runs them
beside diffquant on the same seeded tensors.

    git --git-dir=<mirror of Xiuyu-Li/q-diffusion> show HEAD:qdiff/quant_layer.py > /tmp/refq/qdiff/quant_layer.py
    (same for qdiff/adaptive_rounding.py and qdiff/block_recon.py)
    python benchmarks/crosscheck_qdiffusion.py --ref /tmp/refq --ref-commit <sha>

What is compared
----------------
* Weights, per output channel, 4 and 8 bits, asymmetric and symmetric: the reference
  ``UniformAffineQuantizer(channel_wise=True)`` with ``scale_method='mse'`` (80-step Lp clipping search,
  p = 2.4; the LDM / Stable Diffusion weight setting) and ``'max'`` against diffquant's
  ``WeightQuantizer`` with the ``lp`` and ``minmax`` estimators: scale (delta), zero point, and the
  fake-quantized weight.
* Activation-like tensors, per tensor, 8 bits, ``'mse'`` and ``'max'`` against diffquant's
  ``lp_search`` / ``minmax`` on the same tensor.
* Rounding alone: the reference forward pass fed diffquant's own scale/zero point, against
  diffquant's ``fake_quantize`` (``x / delta`` versus ``x * (1 / delta)``).
* Diagnosis of every Lp-search disagreement: both sides' score curves over the 80 clipping ratios
  (the reference's scores from its own ``quantize`` and ``lp_loss``).
* AdaRound on the same weight and the same scale/zero point: alpha initialisation, soft values,
  hard values (reference forward vs diffquant's ``_adaround`` and ``bake_adaround``), at the
  initial alpha and at a perturbed ("trained") alpha shared by both.
* The rounding regulariser and the beta schedule (reference ``LossFunction`` / ``LinearTempDecay``
  with warm-up 0.2, b_range (20, 2), weight 0.01) against ``round_regularizer`` / ``BetaSchedule``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import platform
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffquant.config import QuantScheme
from diffquant.nn.quantizers import WeightQuantizer
from diffquant.quant.adaround import BetaSchedule, rectified_sigmoid, round_regularizer
from diffquant.quant.affine import fake_quantize, group_view, qparams_from_range
from diffquant.quant.estimators import lp_search

REF_FILES = ("qdiff/quant_layer.py", "qdiff/adaptive_rounding.py")


# ---- loading the reference ---------------------------------------------------------------------
def load_reference(ref: Path):
    missing = [f for f in REF_FILES if not (ref / f).is_file()]
    if missing:
        sys.exit(
            f"error: the reference implementation is not at --ref {ref} (missing {', '.join(missing)}).\n"
            f"Check out Xiuyu-Li/q-diffusion's {', '.join(REF_FILES)} (and qdiff/block_recon.py for the "
            f"regulariser/schedule check) under that directory; it is never copied into diffquant."
        )
    # A bare package object: the reference's qdiff/__init__.py imports its LDM code, which is not needed.
    pkg = types.ModuleType("qdiff")
    pkg.__path__ = [str(ref / "qdiff")]
    sys.modules["qdiff"] = pkg
    ql = importlib.import_module("qdiff.quant_layer")
    ar = importlib.import_module("qdiff.adaptive_rounding")
    br = None
    if (ref / "qdiff/block_recon.py").is_file():
        # block_recon imports model/block/utility modules that pull in LDM; stub the names it imports.
        stubs = {
            "qdiff.quant_model": {"QuantModel": type("QuantModel", (nn.Module,), {})},
            "qdiff.quant_block": {"BaseQuantBlock": type("BaseQuantBlock", (nn.Module,), {})},
            "qdiff.utils": {"save_grad_data": None, "save_inp_oup_data": None},
        }
        for name, attrs in stubs.items():
            m = types.ModuleType(name)
            m.__dict__.update(attrs)
            sys.modules[name] = m
        br = importlib.import_module("qdiff.block_recon")
    return ql, ar, br


# ---- helpers ------------------------------------------------------------------------------------
def cmp(a: torch.Tensor, b: torch.Tensor) -> dict:
    a = a.detach().double().reshape(-1)
    b = b.detach().double().reshape(-1)
    d = (a - b).abs()
    rel = d / b.abs().clamp_min(1e-30)
    return {
        "n": a.numel(),
        "frac_equal": float((a == b).double().mean()),
        "n_differ": int((a != b).sum()),
        "max_abs_diff": float(d.max()),
        "max_rel_diff": float(rel.max()),
    }


def ref_uaq(ql, bits, sym, channel_wise, method):
    return ql.UniformAffineQuantizer(n_bits=bits, symmetric=sym, channel_wise=channel_wise, scale_method=method)


def ref_forward_with(ql, x, bits, sym, channel_wise, delta, zp):
    """The reference forward pass with a given delta / zero point (no initialisation)."""
    q = ref_uaq(ql, bits, sym, channel_wise, "max")
    q.delta, q.zero_point, q.inited = delta, zp, True
    with torch.no_grad():
        return q(x)


def range_scale_f64(rows: torch.Tensor, bits: int) -> torch.Tensor:
    """(max - min) / (2^b - 1) evaluated in float64 and rounded once to float32."""
    r = rows.double()
    return ((r.amax(1, keepdim=True) - r.amin(1, keepdim=True)) / (2**bits - 1)).float()


def clip_ratio_stats(rows: torch.Tensor, scale: torch.Tensor, bits: int, sym: bool) -> dict:
    """Which clipping ratios the Lp search chose (so that agreement is not only at ratio 1.0)."""
    full, _ = qparams_from_range(rows.amin(1, keepdim=True), rows.amax(1, keepdim=True), bits, sym)
    r = (scale / full).reshape(-1)
    return {"min": round(float(r.min()), 4), "max": round(float(r.max()), 4),
            "rows_clipped": int((r < 0.995).sum()), "rows": r.numel()}


def tie_stats(x: torch.Tensor, scale: torch.Tensor, differ: torch.Tensor) -> dict:
    """How close the differing elements are to a rounding tie (x/scale half-way between integers)."""
    if int(differ.sum()) == 0:
        return {"n_differ": 0}
    v = (x.double() / scale.double())[differ]
    dist = ((v - torch.floor(v)) - 0.5).abs()
    return {"n_differ": int(differ.sum()), "max_dist_from_half": float(dist.max())}


def ref_score_curve(ql, ref_q, row: torch.Tensor, grid: int = 80) -> torch.Tensor:
    """The reference's own Lp scores over its clipping grid (its quantize + lp_loss)."""
    xmax, xmin = row.max(), row.min()
    out = []
    for i in range(grid):
        xq = ref_q.quantize(row, xmax * (1.0 - (i * 0.01)), xmin * (1.0 - (i * 0.01)))
        out.append(float(ql.lp_loss(row, xq, p=2.4, reduction="all")))
    return torch.tensor(out, dtype=torch.float64)


def our_score_curve(row: torch.Tensor, scheme: QuantScheme, grid: int = 80) -> torch.Tensor:
    x = row.reshape(1, -1).float()
    xmin, xmax = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    out = []
    for i in range(grid):
        r = 1.0 - 0.01 * i
        s, z = qparams_from_range(xmin * r, xmax * r, scheme.bits, scheme.symmetric)
        xq = fake_quantize(x, s, z, scheme.bits, scheme.symmetric)
        out.append(float((x - xq).abs().pow(scheme.lp_p).mean()))
    return torch.tensor(out, dtype=torch.float64)


def first_argmin(c: torch.Tensor) -> int:
    # strict "<" update from 1e10 / inf, as both implementations do: the first minimum wins
    best, idx = float("inf"), -1
    for i, v in enumerate(c.tolist()):
        if v < best:
            best, idx = v, i
    return idx


def diagnose_lp(ql, bits, rows: torch.Tensor, ours_scale, theirs_scale, scheme) -> list:
    """For rows whose Lp-search scale differs: chosen ratio index on each side and the score gap."""
    out = []
    ref_q = ref_uaq(ql, bits, False, False, "mse")
    differ = (ours_scale.reshape(-1) != theirs_scale.reshape(-1)).nonzero().reshape(-1).tolist()
    for r in differ:
        rc = ref_score_curve(ql, ref_q, rows[r])
        oc = our_score_curve(rows[r], scheme)
        i_t, i_o = first_argmin(rc), first_argmin(oc)
        out.append({
            "row": r,
            "ref_ratio_index": i_t,
            "ours_ratio_index": i_o,
            "ref_score_rel_gap": float((rc[i_o] - rc[i_t]) / rc[i_t]) if i_t >= 0 else None,
            "ours_score_rel_gap": float((oc[i_t] - oc[i_o]) / oc[i_o]) if i_o >= 0 else None,
            "row_min": float(rows[r].min()),
            "row_max": float(rows[r].max()),
        })
    return out


# ---- tensors --------------------------------------------------------------------------------------
def make_weights(gen: torch.Generator) -> dict:
    conv = torch.randn(32, 16, 3, 3, generator=gen) * torch.exp(0.5 * torch.randn(32, 1, 1, 1, generator=gen)) * 0.05
    # heavier tails (Student-t, 3 dof) so that clipping matters
    t = torch.distributions.StudentT(3.0)
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    lin = t.sample((48, 96)) * 0.02 * torch.exp(0.5 * torch.randn(48, 1, generator=gen))
    return {"conv3x3 32x16x3x3 (gauss)": conv.float(), "linear 48x96 (student-t)": lin.float()}


def make_acts(gen: torch.Generator) -> dict:
    shape = (4, 32, 16, 16)
    g = torch.randn(shape, generator=gen)
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    heavy = torch.distributions.StudentT(3.0).sample(shape)
    return {
        "gaussian": g,
        "silu(2*gauss)": F.silu(2.0 * torch.randn(shape, generator=gen)),
        "student-t(3)": heavy,
        "softmax (attn probs, >0)": torch.softmax(3.0 * torch.randn(4, 8, 64, 64, generator=gen), dim=-1),
        "offset 2+0.5*gauss (>0)": 2.0 + 0.5 * torch.randn(shape, generator=gen),
    }


# ---- checks ---------------------------------------------------------------------------------------
def weight_case(ql, name, w, bits, sym, ref_method):
    est = "lp" if ref_method == "mse" else "minmax"
    scheme = QuantScheme(bits=bits, symmetric=sym, granularity="per_channel", estimator=est)
    wq = WeightQuantizer(scheme, w.shape)
    wq.init_from(w)
    with torch.no_grad():
        ours = wq(w)
    rq = ref_uaq(ql, bits, sym, True, ref_method)
    res = {"kind": "weight", "tensor": name, "bits": bits, "symmetric": sym,
           "ref_method": ref_method, "ours_estimator": est}
    try:
        with torch.no_grad():
            theirs = rq(w)
    except Exception as e:  # the reference may fail on some inputs
        res["ref_error"] = f"{type(e).__name__}: {e}"
        return res, None
    t_scale = rq.delta.reshape(-1, 1).float()
    t_zp = torch.as_tensor(rq.zero_point).float().reshape(-1, 1).expand_as(t_scale)
    res["scale"] = cmp(wq.scale, t_scale)
    res["zero_point"] = cmp(wq.zero_point, t_zp)
    res["fake_quant"] = cmp(ours, theirs)
    rows = group_view(w, scheme)
    if ref_method == "max" and not sym:
        # the reference computes the 'max' range in Python floats (float64), diffquant in float32
        res["scale_equal_if_range_in_float64"] = float((t_scale == range_scale_f64(rows, bits)).double().mean())
    if sym and ref_method == "mse":
        res["ref_zero_point_min_max"] = [float(t_zp.min()), float(t_zp.max())]
    # rounding alone: the reference forward with diffquant's qparams
    shp = (-1,) + (1,) * (w.dim() - 1)
    theirs_same = ref_forward_with(ql, w, bits, sym, True, wq.scale.reshape(shp).clone(), wq.zero_point.reshape(shp).clone())
    res["rounding_same_qparams"] = cmp(ours, theirs_same)
    diff = (ours != theirs_same).reshape(w.shape[0], -1)
    res["rounding_same_qparams"]["ties"] = tie_stats(rows, wq.scale, diff)
    if ref_method == "mse":
        res["ours_clip_ratio"] = clip_ratio_stats(rows, wq.scale, bits, sym)
    if ref_method == "mse" and not sym:
        res["lp_disagreements"] = diagnose_lp(ql, bits, rows, wq.scale, t_scale, scheme)
    return res, wq


def act_case(ql, name, x, bits, sym, ref_method):
    est = "lp" if ref_method == "mse" else "minmax"
    scheme = QuantScheme(bits=bits, symmetric=sym, granularity="per_tensor", estimator=est)
    rows = x.reshape(1, -1)
    if est == "lp":
        s, z = lp_search(rows, scheme)
    else:
        s, z = qparams_from_range(rows.amin(1, keepdim=True), rows.amax(1, keepdim=True), bits, sym)
    s, z = s.reshape(()), z.reshape(())
    ours = fake_quantize(x, s, z, bits, sym)
    rq = ref_uaq(ql, bits, sym, False, ref_method)
    with torch.no_grad():
        theirs = rq(x)
    t_scale = torch.as_tensor(rq.delta).float().reshape(())
    t_zp = torch.as_tensor(rq.zero_point).float().reshape(())
    res = {"kind": "activation", "tensor": name, "bits": bits, "symmetric": sym,
           "ref_method": ref_method, "ours_estimator": est,
           "x_min": float(x.min()), "x_max": float(x.max()),
           "ours_scale": float(s), "ours_zero_point": float(z),
           "ref_scale": float(t_scale), "ref_zero_point": float(t_zp),
           "scale": cmp(s, t_scale), "zero_point": cmp(z, t_zp), "fake_quant": cmp(ours, theirs),
           "lp2.4_error_ours": float((x - ours).abs().pow(2.4).mean()),
           "lp2.4_error_ref": float((x - theirs).abs().pow(2.4).mean())}
    if ref_method == "max" and not sym:
        res["scale_equal_if_range_in_float64"] = float((t_scale == range_scale_f64(rows, bits).reshape(())).double().mean())
    theirs_same = ref_forward_with(ql, x, bits, sym, False, s.clone(), z.clone())
    res["rounding_same_qparams"] = cmp(ours, theirs_same)
    res["rounding_same_qparams"]["ties"] = tie_stats(x, s, ours != theirs_same)
    if ref_method == "mse":
        res["ours_clip_ratio"] = clip_ratio_stats(rows, s.reshape(1, 1), bits, sym)
    if ref_method == "mse" and not sym:
        res["lp_disagreements"] = diagnose_lp(ql, bits, rows, s.reshape(1, 1), t_scale.reshape(1, 1), scheme)
        # the reference's choice re-scored by diffquant (and vice versa), for the one row
        if res["lp_disagreements"]:
            d = res["lp_disagreements"][0]
            res["lp_disagreements"][0]["note"] = (
                "ratio indices differ" if d["ref_ratio_index"] != d["ours_ratio_index"] else "same ratio index")
    return res


def tie_case(ql, gen, n_scales=16, n=4096, bits=8):
    """Rounding alone at (near-)ties: x = (k + 1/2) * delta in float32, per tensor, same delta and
    zero point on both sides; the only difference left is x / delta against x * (1 / delta)."""
    n_diff = 0
    n_fused_diff = 0  # diffquant vs PyTorch's fused fake_quantize kernel (which multiplies by 1/scale)
    total = 0
    worst = 0.0
    for _ in range(n_scales):
        delta = torch.exp(torch.empty(()).uniform_(-8.0, 0.0, generator=gen)).float()
        k = torch.randint(-100, 100, (n,), generator=gen).float()
        x = ((k + 0.5) * delta).float()
        s, z = qparams_from_range(x.min(), x.max(), bits, False)
        ours = fake_quantize(x, s, z, bits, False)
        theirs = ref_forward_with(ql, x, bits, False, False, s.clone(), z.clone())
        fused = torch.fake_quantize_per_tensor_affine(x, float(s), int(z), 0, 2**bits - 1)
        n_fused_diff += int((fused != ours).sum())
        d = ours != theirs
        n_diff += int(d.sum())
        total += n
        if d.any():
            worst = max(worst, float((ours - theirs).abs().max() / s))
    return {"kind": "ties", "tensor": f"(k+1/2)*delta, {n_scales} random deltas x {n} values", "bits": bits,
            "n": total, "n_differ": n_diff, "frac_equal": 1 - n_diff / total, "max_diff_in_steps": worst,
            "n_differ_ours_vs_torch_fused_kernel": n_fused_diff}


def adaround_case(ql, ar, name, w, wq: WeightQuantizer, bits, sym, gen):
    """Same weight, same scale/zero point (diffquant's): alpha init, soft and hard values."""
    shp = (-1,) + (1,) * (w.dim() - 1)
    uaq = ref_uaq(ql, bits, sym, True, "max")
    uaq.delta = wq.scale.reshape(shp).clone()
    uaq.zero_point = wq.zero_point.reshape(shp).clone()
    uaq.inited = True
    raq = ar.AdaRoundQuantizer(uaq, w, round_mode="learned_hard_sigmoid")
    alpha = wq.start_adaround(w)
    res = {"kind": "adaround", "tensor": name, "bits": bits, "symmetric": sym}
    res["alpha_init"] = cmp(alpha.reshape(w.shape), raq.alpha)
    res["alpha_init_sign_agree"] = float(((alpha.reshape(w.shape) >= 0) == (raq.alpha >= 0)).double().mean())
    # x / delta (reference) vs x * (1 / delta) (diffquant) straddling an integer or a half:
    v_t = w / uaq.delta
    v_o = group_view(w, wq.scheme) * (1.0 / wq.scale)
    feq = (torch.floor(v_t).reshape(-1) == torch.floor(v_o).reshape(-1))
    res["floor_equal"] = float(feq.double().mean())
    feq = feq.reshape(w.shape)

    def put(key, ours_v, ref_v):
        res[key] = cmp(ours_v, ref_v)
        # where floor(x/delta) == floor(x*(1/delta)), i.e. away from exact grid points
        res[key + "_where_floor_equal"] = cmp(ours_v[feq], ref_v[feq])
    if sym:
        # the same signed grid written as the reference's unsigned one: [0, 2^b - 1], zero point 2^(b-1)
        u = ref_uaq(ql, bits, False, True, "max")
        u.delta = uaq.delta
        u.zero_point = torch.full_like(uaq.delta, 2.0 ** (bits - 1))
        u.inited = True
        raq_u = ar.AdaRoundQuantizer(u, w, round_mode="learned_hard_sigmoid")
    res["h_init"] = cmp(rectified_sigmoid(alpha).reshape(w.shape), raq.get_soft_targets())

    def both(tag):
        with torch.no_grad():
            raq.soft_targets = True
            wq.rounding = "soft"
            put(f"soft_{tag}", wq(w), raq(w))
            if sym:
                raq_u.soft_targets = True
                put(f"soft_{tag}_ref_unsigned_grid", wq(w), raq_u(w))
            raq.soft_targets = False
            wq.rounding = "hard"
            o_hard, t_hard = wq(w), raq(w)
            put(f"hard_{tag}", o_hard, t_hard)
            if sym:
                raq_u.soft_targets = False
                put(f"hard_{tag}_ref_unsigned_grid", o_hard, raq_u(w))
            codes_o = torch.round(o_hard.reshape(w.shape[0], -1) / wq.scale) + wq.zero_point
            codes_t = torch.round(t_hard.reshape(w.shape[0], -1) / wq.scale) + wq.zero_point
            res[f"hard_codes_equal_{tag}"] = float((codes_o == codes_t).double().mean())
            wq.rounding = "soft"

    both("init_alpha")
    # a "trained" alpha: the initial one plus noise, copied into both
    with torch.no_grad():
        noise = 3.0 * torch.randn(alpha.shape, generator=gen)
        alpha.add_(noise)
        raq.alpha.data.copy_(alpha.reshape(w.shape))
        if sym:
            raq_u.alpha.data.copy_(alpha.reshape(w.shape))
    both("perturbed_alpha")
    with torch.no_grad():
        raq.soft_targets = False
        t_hard = raq(w)
    baked = wq.bake_adaround(w)
    res["bake_vs_ref_hard"] = cmp(baked, t_hard)
    # the baked weight is a fixed point of nearest rounding with the same qparams
    with torch.no_grad():
        res["bake_then_nearest_is_identity"] = cmp(wq(baked), baked)["frac_equal"]
    return res


def regulariser_check(ql, ar, br, gen, iters=2000):
    """Reference LossFunction (relaxation, weight 0.01, warm-up 0.2, b 20->2) vs diffquant's
    round_regularizer + BetaSchedule, with a fixed alpha, over a whole schedule."""
    lin = nn.Linear(96, 48)
    qm = ql.QuantModule(lin, weight_quant_params={"n_bits": 4, "channel_wise": True, "scale_method": "max"},
                        act_quant_params={"n_bits": 8})
    w = lin.weight.data
    uaq = ref_uaq(ql, 4, False, True, "max")
    with torch.no_grad():
        uaq(w)
    raq = ar.AdaRoundQuantizer(uaq, w, round_mode="learned_hard_sigmoid")
    with torch.no_grad():
        raq.alpha.data.add_(2.0 * torch.randn(raq.alpha.shape, generator=gen))
    qm.weight_quantizer = raq
    lf = br.LossFunction(qm, round_loss="relaxation", weight=0.01, rec_loss="mse", max_count=iters,
                         b_range=(20, 2), decay_start=0, warmup=0.2, p=2.0)
    sched = BetaSchedule(iters, warmup=0.2, start=20.0, end=2.0)
    alpha = raq.alpha.detach().clone()
    zero = torch.zeros(2, 3)
    ref_vals, ours_vals = [], []
    with torch.no_grad():
        for it in range(iters):  # iteration `it` of each training loop; both use the 1-based count it+1
            ref_vals.append(float(lf(zero, zero)))  # rec loss is 0, so this is the regulariser
            count = it + 1  # as diffquant's qdiffusion loop passes it
            ours_vals.append(float(0.01 * round_regularizer(alpha, sched.beta(count))) if sched.regularizer_on(count) else 0.0)
    ref_v = torch.tensor(ref_vals, dtype=torch.float64)
    our_v = torch.tensor(ours_vals, dtype=torch.float64)
    ref_on = (ref_v != 0).nonzero()
    our_on = (our_v != 0).nonzero()
    out = {
        "iters": iters,
        "first_iteration_with_regulariser_ref": int(ref_on[0]) if len(ref_on) else None,
        "first_iteration_with_regulariser_ours": int(our_on[0]) if len(our_on) else None,
        "same_iteration_max_rel_diff": float(((our_v - ref_v).abs() / ref_v.abs().clamp_min(1e-30))[our_v != 0].max()),
    }
    for T in (iters, 20000):
        td = br.LinearTempDecay(T, rel_start_decay=0.2, start_b=20, end_b=2)
        s = BetaSchedule(T, warmup=0.2, start=20.0, end=2.0)
        same = max(abs(s.beta(i) - td(i)) for i in range(T))
        as_run = max(abs(s.beta(i + 1) - td(i + 1)) for i in range(T))
        out[f"beta_T{T}"] = {"max_abs_diff_same_count": same,
                             "max_abs_diff_as_run (both at count=k+1)": as_run,
                             "ours_last_beta": s.beta(T), "ref_last_beta": td(T)}
    return out


# ---- table ----------------------------------------------------------------------------------------
def fmt(v):
    return "-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))


def print_table(results):
    print(f"{'case':58s} {'scale =':>8s} {'scale rel':>9s} {'zp =':>6s} {'FQ =':>8s} {'FQ maxdiff':>10s} {'round =':>8s}")
    for r in results:
        if r["kind"] == "adaround":
            continue
        tag = f"{r['kind'][:3]} {r['tensor']} {r['bits']}b {'sym' if r['symmetric'] else 'asym'} {r['ref_method']}/{r['ours_estimator']}"
        if "ref_error" in r:
            print(f"{tag:58s} reference raised {r['ref_error']}")
            continue
        print(f"{tag:58s} {r['scale']['frac_equal']:8.4f} {r['scale']['max_rel_diff']:9.2e} "
              f"{r['zero_point']['frac_equal']:6.3f} {r['fake_quant']['frac_equal']:8.5f} "
              f"{r['fake_quant']['max_abs_diff']:10.3e} {r['rounding_same_qparams']['frac_equal']:8.6f}")
    print()
    print(f"{'AdaRound case':44s} {'alpha maxabs':>12s} {'sign=':>7s} {'soft= init':>10s} {'soft maxdiff':>12s} {'hard= init':>10s} "
          f"{'soft= pert':>10s} {'hard= pert':>10s} {'bake=ref':>8s}")
    for r in results:
        if r["kind"] != "adaround":
            continue
        tag = f"{r['tensor']} {r['bits']}b {'sym' if r['symmetric'] else 'asym'}"
        print(f"{tag:44s} {r['alpha_init']['max_abs_diff']:12.2e} {r['alpha_init_sign_agree']:7.5f} {r['soft_init_alpha']['frac_equal']:10.5f} "
              f"{max(r['soft_init_alpha']['max_abs_diff'], r['soft_perturbed_alpha']['max_abs_diff']):12.2e} "
              f"{r['hard_init_alpha']['frac_equal']:10.5f} {r['soft_perturbed_alpha']['frac_equal']:10.5f} "
              f"{r['hard_perturbed_alpha']['frac_equal']:10.5f} {r['bake_vs_ref_hard']['frac_equal']:8.5f}")
        if r["symmetric"]:
            print(f"{'  same, reference on unsigned grid, z=2^(b-1)':44s} {'':12s} {'':7s} "
                  f"{r['soft_init_alpha_ref_unsigned_grid']['frac_equal']:10.5f} "
                  f"{max(r['soft_init_alpha_ref_unsigned_grid']['max_abs_diff'], r['soft_perturbed_alpha_ref_unsigned_grid']['max_abs_diff']):12.2e} "
                  f"{r['hard_init_alpha_ref_unsigned_grid']['frac_equal']:10.5f} "
                  f"{r['soft_perturbed_alpha_ref_unsigned_grid']['frac_equal']:10.5f} "
                  f"{r['hard_perturbed_alpha_ref_unsigned_grid']['frac_equal']:10.5f}")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ref", required=True, type=Path, help="directory holding the reference's qdiff/*.py")
    ap.add_argument("--ref-commit", default=None, help="commit of Xiuyu-Li/q-diffusion the files came from (recorded)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/crosscheck_qdiffusion.json"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ql, ar, br = load_reference(args.ref)
    import warnings
    warnings.filterwarnings("ignore", message="Quantization range close to zero")

    gen = torch.Generator().manual_seed(args.seed)
    weights = make_weights(gen)
    acts = make_acts(gen)
    results = []
    lp_wq = {}
    for name, w in weights.items():
        for bits in (4, 8):
            for sym in (False, True):
                for method in ("mse", "max"):
                    r, wq = weight_case(ql, name, w, bits, sym, method)
                    results.append(r)
                    if method == "mse" and wq is not None:
                        lp_wq[(name, bits, sym)] = wq
    for name, x in acts.items():
        for sym, method in ((False, "mse"), (False, "max"), (True, "max")):
            results.append(act_case(ql, name, x, 8, sym, method))
    # dead (all-zero) output channel: edge case
    w_dead = weights["linear 48x96 (student-t)"].clone()
    w_dead[5] = 0
    r, _ = weight_case(ql, "linear 48x96, row 5 all zero", w_dead, 4, False, "mse")
    wq_dead = WeightQuantizer(QuantScheme(bits=4, granularity="per_channel", estimator="lp"), w_dead.shape)
    wq_dead.init_from(w_dead)
    r["ours_dead_row"] = {"scale": float(wq_dead.scale[5]), "zero_point": float(wq_dead.zero_point[5]),
                          "fake_quant_max_abs": float(wq_dead(w_dead)[5].abs().max())}
    results.append(r)
    ties = tie_case(ql, gen)
    # AdaRound with diffquant's Lp-search qparams
    for (name, bits, sym), wq in lp_wq.items():
        results.append(adaround_case(ql, ar, name, weights[name], wq, bits, sym, gen))
    reg = regulariser_check(ql, ar, br, gen) if br is not None else None

    print_table(results)
    print(f"\nrounding at constructed ties {ties['tensor']}: {ties['n_differ']} of {ties['n']} differ "
          f"(max {ties['max_diff_in_steps']:.0f} step); diffquant vs torch.fake_quantize_per_tensor_affine: "
          f"{ties['n_differ_ours_vs_torch_fused_kernel']} differ")
    if reg is not None:
        print("\nregulariser / beta schedule:", json.dumps(reg, indent=1))

    out = {
        "reference": {"repo": "Xiuyu-Li/q-diffusion", "commit": args.ref_commit,
                      "files": list(REF_FILES) + (["qdiff/block_recon.py"] if br is not None else [])},
        "device": f"cpu ({cpu_name()}), torch {torch.__version__}, {args.threads} thread(s)",
        "date": _dt.date.today().isoformat(),
        "seed": args.seed,
        "results": results,
        "ties": ties,
        "regulariser_and_beta": reg,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
