"""diffquant sensitivity FP_MODEL QUANTIZED: per-time-step noise-prediction error."""
from __future__ import annotations

import click

from diffquant.commands._common import emit_json, fail, format_table
from diffquant.commands._options import device_option, resolve_device, sampler_options


@click.command("sensitivity")
@click.argument("fp_model")
@click.argument("quantized")
@sampler_options(default_steps=20)
@click.option("--num", type=int, default=16, show_default=True, help="trajectories")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True)
@device_option
@click.option("--json", "as_json", is_flag=True)
def command(fp_model, quantized, sampler, steps, spacing, eta, num, seed, batch_size, device, as_json):
    """Which sampling steps suffer most: the quantized model's noise-prediction error per time step,
    both models evaluated on the full-precision trajectory."""
    from diffquant.evaluation.sensitivity import timestep_sensitivity
    from diffquant.models.loading import load_model
    from diffquant.sampling import SamplerSpec

    dev = resolve_device(device)
    try:
        spec = SamplerSpec(sampler, steps, spacing, eta)
        fp = load_model(fp_model, device=dev)
        q = load_model(quantized, device=dev)
        if not q.quantized:
            fail(f"{quantized} is not a quantized checkpoint folder")
        rows = timestep_sensitivity(fp.model, q.model, fp.scheduler, num=num, seed=seed, spec=spec,
                                    batch_size=batch_size, device=dev, progress=True)
    except ValueError as e:
        fail(str(e))
    if as_json:
        emit_json({"fp_model": fp_model, "quantized": quantized, "sampler": spec.to_dict(), "num": num, "rows": rows})
    else:
        click.echo(format_table(rows))
