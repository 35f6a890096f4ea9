"""diffquant demo: FP vs W8A8 vs W4A8 naive on the bundled default model."""
from __future__ import annotations

import click

from diffquant.commands._common import emit_json, fail


@click.command("demo")
@click.option("--model", default=None, help="default: zoo:cifar10-ddpm (zoo:tiny-random until it is bundled)")
@click.option("--num", type=int, default=64, show_default=True)
@click.option("--steps", type=int, default=20, show_default=True)
@click.option("--calib-num", type=int, default=32, show_default=True)
@click.option("--calib-st", type=int, default=10, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--out", "out_dir", default="diffquant-demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True)
def command(model, num, steps, calib_num, calib_st, seed, device, out_dir, as_json):
    """Run the main job on the bundled default model and write a report folder."""
    from diffquant.demo import run_demo

    try:
        res = run_demo(out_dir, model=model, num=num, steps=steps, calib_num=calib_num, calib_st=calib_st,
                       seed=seed, device=device)
    except ValueError as e:
        fail(str(e))
    if as_json:
        emit_json({k: v for k, v in res.items() if k != "table"})
    else:
        env = res["env"]
        click.echo(f"model {env['model']}, {env['num']} samples, DDIM {env['sampler']['steps']} steps, "
                   f"device {env['device']}")
        click.echo(res["table"])
        click.echo(f"report: {out_dir}/report.md")
