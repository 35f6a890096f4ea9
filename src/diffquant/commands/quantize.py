"""diffquant quantize MODEL ... --out DIR"""
from __future__ import annotations

import time

import click

from diffquant.commands._common import emit_json, fail
from diffquant.commands._options import device_option, resolve_device, sampler_options


@click.command("quantize")
@click.argument("model")
@click.option("--weight-bits", type=int, default=8, show_default=True, help="2..8, or 16/32 to keep weights in floating point.")
@click.option("--act-bits", type=int, default=8, show_default=True, help="2..8, or 16/32 to keep activations in floating point.")
@click.option("--method", type=click.Choice(["naive", "qdiffusion"]), default="naive", show_default=True,
              help="naive: round-to-nearest + calibrated ranges; qdiffusion: block reconstruction (AdaRound + LSQ)")
@click.option("--preset", type=click.Choice(["paper", "fast", "fast-2k"]), default="fast", show_default=True,
              help="qdiffusion hyper-parameters: paper = 20k weight / 5k activation iterations, batch 32")
@click.option("--weight-iters", type=int, default=None, help="qdiffusion: AdaRound iterations per unit (overrides the preset)")
@click.option("--act-iters", type=int, default=None, help="qdiffusion: step-size iterations per unit (overrides the preset)")
@click.option("--act-keep-best", "act_keep_best", type=int, default=None, metavar="ROWS",
              help="qdiffusion: per unit, keep the initial activation step sizes where they reconstruct better than the "
                   "learned ones on ROWS captured rows (default 0: always the learned ones, as in the paper)")
@click.option("--resume", is_flag=True, help="qdiffusion: continue from the per-unit checkpoints in --work-dir")
@click.option("--work-dir", type=click.Path(file_okay=False), default=None,
              help="qdiffusion: per-unit checkpoints (default: OUT/recon)")
@click.option("--weight-estimator", type=click.Choice(["minmax", "lp", "percentile"]), default=None,
              help="weight range estimator [default: minmax for naive, lp for qdiffusion]")
@click.option("--act-estimator", type=click.Choice(["minmax", "lp", "percentile", "ema"]), default=None,
              help="activation range estimator [default: minmax for naive, lp for qdiffusion]")
@click.option("--granularity", type=click.Choice(["per_channel", "per_tensor", "per_group"]), default="per_channel", show_default=True,
              help="weight quantization granularity")
@click.option("--group-size", type=int, default=None, help="with --granularity per_group")
@click.option("--weight-symmetric/--weight-asymmetric", default=False, show_default=True)
@click.option("--act-symmetric/--act-asymmetric", default=False, show_default=True)
@click.option("--softmax-bits", type=int, default=16, show_default=True, help="bits of attention probabilities (16 = off)")
@click.option("--quant-attention/--no-quant-attention", default=True, show_default=True, help="quantize Q·Kᵀ and softmax·V inputs")
@click.option("--split-shortcut/--no-split-shortcut", default=True, show_default=True)
@click.option("--first-last-bits", type=int, default=8, show_default=True,
              help="keep the first and last layers (conv_in, conv_out) at this many bits where the main scheme is "
                   "narrower, as BRECQ and Q-Diffusion do; 0 = no exception")
@click.option("--override", "overrides", multiple=True, metavar="PATTERN=SPEC",
              help="per-layer exception, e.g. 'conv_in=skip', 'time_embedding.*=w8a8', 'conv_out=a16' (repeatable)")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="a QuantConfig JSON file (replaces the bit/estimator options above)")
@click.option("--calib-num", type=int, default=None,
              help="calibration trajectories = samples per step [default: 32 naive; 64 qdiffusion fast; 256 paper]")
@click.option("--calib-st", type=int, default=None,
              help="calibration time steps, uniform over the trajectory [default: 10 naive; 20 qdiffusion]")
@sampler_options(default_steps=None, prefix="calib-", help_prefix="calibration ")
@click.option("--calib-chains", default=None, metavar="K,K,...",
              help="consistency models: calibrate on the noise levels of the K-step chains "
                   "[default: 1,2,4 up to --calib-steps (default 4)]")
@click.option("--calib-data", type=click.Path(dir_okay=False), default=None,
              help="calibration set (.safetensors): loaded if it exists, else captured and saved there")
@click.option("--batch-size", type=int, default=None,
              help="batch of calibration sampling and calibration passes [default: 32; qdiffusion: the preset's "
                   "capture batch]")
@click.option("--weights-from", type=click.Path(file_okay=False), default=None,
              help="qdiffusion: take the finished weight stage of another run (its --work-dir, e.g. the W4A32 run "
                   "when quantizing W4A8) and reconstruct activations only; refused unless the model, calibration "
                   "set, weight config and weight-stage settings match")
@click.option("--seed", type=int, default=0, show_default=True)
@device_option
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="output folder")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
def command(model, weight_bits, act_bits, method, preset, weight_iters, act_iters, act_keep_best, resume, work_dir, weight_estimator, act_estimator, granularity, group_size,
            weight_symmetric, act_symmetric, softmax_bits, quant_attention, split_shortcut, first_last_bits, overrides, config_path,
            calib_num, calib_st, calib_sampler, calib_steps, calib_spacing, calib_eta, calib_chains, calib_data, batch_size,
            weights_from, seed, device, out_dir, as_json):
    """Quantize MODEL (zoo:NAME, a diffusers folder, or a hub id) and write a quantized checkpoint."""
    from diffquant.config import QuantConfig
    from diffquant.io import save_quantized
    from diffquant.models.loading import load_model
    from diffquant.quantize import quant_report
    from diffquant.recipes import CalibOptions, build_config, get_calibration, needs_calibration, run_ptq
    from diffquant.sampling import SamplerSpec

    dev = resolve_device(device)
    user_steps, user_st = calib_steps, calib_st  # before the (DDPM-oriented) defaults below
    default_est = "lp" if method == "qdiffusion" else "minmax"
    if method == "qdiffusion":
        from diffquant.algorithms.qdiffusion import PRESET_CALIB

        calib_num = calib_num or PRESET_CALIB[preset]["num_per_step"]
        calib_st = calib_st or PRESET_CALIB[preset]["num_steps"]
        calib_steps = calib_steps or 100
    else:
        calib_num, calib_st, calib_steps = calib_num or 32, calib_st or 10, calib_steps or 20
    weight_estimator = weight_estimator or default_est
    act_estimator = act_estimator or default_est
    method_kwargs = {}
    if method == "qdiffusion":
        from pathlib import Path

        import dataclasses

        from diffquant.algorithms.qdiffusion import PRESETS

        recon = PRESETS[preset]
        if weight_iters is not None:
            recon = dataclasses.replace(recon, weight_iters=weight_iters)
        if act_iters is not None:
            recon = dataclasses.replace(recon, act_iters=act_iters)
        if act_keep_best is not None:
            recon = dataclasses.replace(recon, act_keep_best_rows=act_keep_best)
        method_kwargs = {"preset": preset, "recon": recon, "resume": resume,
                         "checkpoint_dir": work_dir or str(Path(out_dir) / "recon"), "weights_from": weights_from}
    elif weight_iters is not None or act_iters is not None or act_keep_best is not None or resume or weights_from:
        fail("--weight-iters/--act-iters/--act-keep-best/--resume/--weights-from apply to --method qdiffusion only")
    try:
        if config_path:
            cfg = QuantConfig.from_json(config_path)
        else:
            cfg = build_config(weight_bits, act_bits, weight_estimator=weight_estimator, act_estimator=act_estimator,
                               weight_granularity=granularity, group_size=group_size, weight_symmetric=weight_symmetric,
                               act_symmetric=act_symmetric, softmax_bits=softmax_bits, quantize_attention=quant_attention,
                               split_shortcut=split_shortcut, overrides=overrides,
                               first_last_bits=first_last_bits or None)
        spec = SamplerSpec(calib_sampler, calib_steps, calib_spacing, calib_eta)
        loaded = load_model(model, device=dev)
        if loaded.quantized:
            fail(f"{model} is already quantized; pass the full-precision model")
        chains = None
        if _is_consistency_model(loaded.scheduler) or calib_sampler == "cm" or calib_chains:
            spec, chains, calib_st = cm_calibration_plan(loaded.scheduler, calib_sampler, user_steps, user_st, calib_chains)
        t0 = time.perf_counter()
        calib = None
        if needs_calibration(cfg) or method == "qdiffusion":  # block reconstruction needs data even weights-only
            calib = get_calibration(loaded.model, loaded.scheduler,
                                    CalibOptions(calib_num, calib_st, spec, batch_size=batch_size or 32, path=calib_data,
                                                 cm_chains=chains), dev)
        capture_s = time.perf_counter() - t0
        if batch_size is not None:
            method_kwargs["batch_size"] = batch_size
        q = run_ptq(loaded.model, cfg, method, calib, device=dev, seed=seed, **method_kwargs)
    except (ValueError, MemoryError) as e:
        fail(str(e))
    report = quant_report(q)
    info = q._diffquant_method
    info["capture_seconds"] = capture_s
    save_quantized(q, out_dir, loaded.scheduler, loaded.source, extra={"report": report.to_dict() | {"layers": None}})
    result = {"out": out_dir, "config": cfg.describe(), "method": method, "calib_rows": len(calib) if calib else 0,
              **{k: v for k, v in info.items() if k != "method"}, "report": report.to_dict()}
    if as_json:
        emit_json(result)
    else:
        click.echo(report.summary())
        click.echo(f"calibration: {result['calib_rows']} inputs, capture {capture_s:.1f}s, "
                   f"method {info['calib_seconds']:.1f}s -> {out_dir}")


def _is_consistency_model(scheduler) -> bool:
    from diffusers import CMStochasticIterativeScheduler

    return isinstance(scheduler, CMStochasticIterativeScheduler)


def cm_calibration_plan(scheduler, sampler, steps, num_levels, chains_text):
    """(SamplerSpec, chains, num_levels) for calibrating a consistency model over its multistep chains.

    The default calibration sampler ('ddim') is replaced by 'cm' for a consistency model (DDIM cannot run
    on its scheduler); the default chains are 1, 2, 4, ... up to ``steps`` (default 4, at most the
    scheduler's N); ``num_levels`` None keeps every noise level those chains visit."""
    from diffquant.sampling import SamplerSpec

    if not _is_consistency_model(scheduler):
        raise ValueError(f"--calib-sampler cm / --calib-chains need a consistency model (CMStochasticIterativeScheduler); "
                         f"the model has {type(scheduler).__name__}")
    if sampler not in ("cm", "ddim"):
        raise ValueError(f"a consistency model is calibrated over its 'cm' chains; --calib-sampler {sampler} cannot run on it")
    n = int(scheduler.config.num_train_timesteps)
    if chains_text:
        try:
            chains = tuple(int(v) for v in str(chains_text).split(",") if v.strip())
        except ValueError:
            raise ValueError(f"--calib-chains expects comma-separated step counts; got {chains_text!r}") from None
        if not chains:
            raise ValueError("--calib-chains names no step count")
        steps = steps or max(chains)
    else:
        steps = steps or min(4, n)
        chains = tuple(k for k in (1, 2, 4, 8, 16, 32, 64) if k < steps) + (steps,)
    return SamplerSpec("cm", int(steps)), chains, num_levels
