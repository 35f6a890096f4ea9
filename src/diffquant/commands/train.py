"""``diffquant train``: the zoo's training recipes (reference DDPM, consistency distillation, feature classifier)."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import click

from diffquant.commands._common import emit_json, fail


@click.group("train")
def command() -> None:
    """Train the zoo's reference models on an image set (see docs/zoo/)."""


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers; got {text!r}") from None


@command.command("ddpm")
@click.option("--data", required=True, type=click.Path(), help="Image set: folder, .zip or packed .npz.")
@click.option("--run-dir", required=True, type=click.Path(file_okay=False), help="Full state, metrics, snapshots.")
@click.option("--unet", default="zoo", show_default=True, help="UNet preset (zoo|tiny) or a JSON config file.")
@click.option("--batch-size", default=128, show_default=True)
@click.option("--lr", default=2e-4, show_default=True)
@click.option("--warmup-steps", default=1000, show_default=True)
@click.option("--dropout", default=0.1, show_default=True)
@click.option("--ema-decay", default=0.9999, show_default=True)
@click.option("--grad-clip", default=1.0, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--amp", type=click.Choice(["auto", "bf16", "none"]), default="auto", show_default=True)
@click.option("--compile/--no-compile", default=False, show_default=True, help="torch.compile the UNet.")
@click.option("--device", default="auto", show_default=True)
@click.option("--max-minutes", type=float, default=None, help="Stop (and save) after this many minutes.")
@click.option("--until-step", type=int, default=None, help="Stop (and save) at this step.")
@click.option("--stop-file", type=click.Path(), default=None, help="Stop (and save) once this file exists.")
@click.option("--resume", default="auto", show_default=True,
              help="'auto' (RUN/state if present), 'none', or a state folder (full: exact; compact: warm restart).")
@click.option("--export-dir", type=click.Path(file_okay=False), default=None,
              help="Also write the compact state (fp16, <=15 MiB shards) here.")
@click.option("--export-every-minutes", type=float, default=None)
@click.option("--save-every-minutes", type=float, default=5.0, show_default=True)
@click.option("--snapshot-steps", default="", help="Comma-separated steps at which to keep an fp16 EMA snapshot.")
@click.option("--moment-steps", default=100, show_default=True, help="Warm restart: batches to re-estimate Adam moments.")
@click.option("--rewarm-steps", default=1000, show_default=True, help="Warm restart: lr re-warm-up steps.")
@click.option("--log-every", default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def ddpm(data, run_dir, unet, batch_size, lr, warmup_steps, dropout, ema_decay, grad_clip, seed, amp, compile,
         device, max_minutes, until_step, stop_file, resume, export_dir, export_every_minutes, save_every_minutes,
         snapshot_steps, moment_steps, rewarm_steps, log_every, as_json) -> None:
    """Train a UNet2DModel DDPM (the zoo:cifar10-ddpm recipe) in resumable chunks."""
    from diffquant.zoo.train_ddpm import DDPMTrainConfig, train_ddpm

    logging.getLogger("diffquant").setLevel(logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    unet_cfg = unet
    if unet.endswith(".json"):
        try:
            unet_cfg = json.loads(Path(unet).read_text())
        except (OSError, ValueError) as e:
            fail(f"cannot read UNet config {unet!r}: {e}")
    cfg = DDPMTrainConfig(
        data=data, run_dir=run_dir, unet=unet_cfg, dropout=dropout, batch_size=batch_size, lr=lr,
        warmup_steps=warmup_steps, grad_clip=grad_clip, ema_decay=ema_decay, seed=seed, amp=amp, compile=compile,
        device=device, log_every=log_every, save_every_minutes=save_every_minutes, export_dir=export_dir,
        export_every_minutes=export_every_minutes, snapshot_steps=_ints(snapshot_steps),
        moment_steps=moment_steps, rewarm_steps=rewarm_steps,
    )
    try:
        out = train_ddpm(cfg, resume=None if resume == "none" else resume, max_minutes=max_minutes,
                         until_step=until_step, stop_file=stop_file)
    except ValueError as e:
        fail(str(e))
    if as_json:
        emit_json(out)
    else:
        click.echo(f"stopped at step {out['step']} ({out['reason']}; started at {out['start_step']}, "
                   f"resumed from: {out['resumed_from']}), {out['wall_seconds']} s")


@command.command("cm")
@click.option("--data", required=True, type=click.Path(), help="Image set: folder, .zip or packed .npz.")
@click.option("--run-dir", required=True, type=click.Path(file_okay=False), help="Full state and metrics.")
@click.option("--teacher", default="zoo:cifar10-ddpm", show_default=True, help="VP diffusion teacher (MODEL argument).")
@click.option("--num-scales", type=int, default=None, help="N, the Karras sigma grid size [default: 18].")
@click.option("--solver", type=click.Choice(["heun", "euler"]), default="heun", show_default=True,
              help="Teacher ODE step between adjacent sigmas (euler = DDIM).")
@click.option("--loss", type=click.Choice(["huber", "l2"]), default="huber", show_default=True)
@click.option("--init", "init", type=click.Choice(["teacher", "random"]), default="teacher", show_default=True)
@click.option("--init-steps", default=1000, show_default=True, help="Denoiser warm-start steps before CD.")
@click.option("--student", "student_json", default=None, metavar="JSON",
              help='UNet2DModel config overrides for the student, e.g. \'{"block_out_channels": [32, 64, 64, 64], '
                   '"norm_num_groups": 16}\' (needs --init random) [default: the teacher\'s architecture]')
@click.option("--batch-size", default=256, show_default=True, help="Global batch (split over torchrun ranks).")
@click.option("--lr", default=2e-4, show_default=True)
@click.option("--warmup-steps", default=500, show_default=True)
@click.option("--target-decay", default=0.95, show_default=True, help="EMA decay mu of the target network.")
@click.option("--ema-decay", default=0.9995, show_default=True, help="EMA decay of the bundled weights.")
@click.option("--dropout", default=0.0, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--amp", type=click.Choice(["auto", "bf16", "none"]), default="auto", show_default=True)
@click.option("--teacher-amp/--no-teacher-amp", default=None, help="bf16 autocast for the teacher [default: as --amp].")
@click.option("--compile/--no-compile", default=False, show_default=True, help="torch.compile the student.")
@click.option("--device", default="auto", show_default=True)
@click.option("--max-minutes", type=float, default=None, help="Stop (and save) after this many minutes.")
@click.option("--until-step", type=int, default=None, help="Stop (and save) at this step.")
@click.option("--stop-file", type=click.Path(), default=None, help="Stop (and save) once this file exists.")
@click.option("--resume", default="auto", show_default=True,
              help="'auto' (RUN/state if present), 'none', or a state folder (full: exact; carry: warm restart).")
@click.option("--carry-dir", type=click.Path(file_okay=False), default=None,
              help="Also write the carry state (the EMA in fp16, <=15 MiB shards) here when stopping or when "
                   "RUN/EXPORT_NOW exists.")
@click.option("--rewarm-steps", default=200, show_default=True, help="Warm restart from a carry state: lr re-warm-up steps.")
@click.option("--save-every-minutes", type=float, default=5.0, show_default=True)
@click.option("--log-every", default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def cm(data, run_dir, teacher, num_scales, solver, loss, init, init_steps, student_json, batch_size, lr, warmup_steps, target_decay,
       ema_decay, dropout, seed, amp, teacher_amp, compile, device, max_minutes, until_step, stop_file, resume, carry_dir,
       rewarm_steps, save_every_minutes, log_every, as_json) -> None:
    """Consistency distillation of a VP teacher (the zoo:cifar10-cm recipe) in resumable chunks; torchrun for DDP."""
    from diffquant.zoo.train_cm import CMTrainConfig, init_distributed, train_cm

    logging.getLogger("diffquant").setLevel(logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        student = {}
        if student_json:
            try:
                student = json.loads(student_json)
            except json.JSONDecodeError as e:
                raise ValueError(f"--student is not valid JSON: {e}") from e
            if not isinstance(student, dict):
                raise ValueError(f"--student must be a JSON object of UNet2DModel config keys; got {student_json!r}")
        init_distributed()
        cfg = CMTrainConfig(
            data=data, run_dir=run_dir, teacher=teacher,
            scheduler={} if num_scales is None else {"num_train_timesteps": num_scales}, solver=solver, loss=loss,
            init=init, init_steps=init_steps, student=student, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
            target_decay=target_decay, ema_decay=ema_decay, dropout=dropout, seed=seed, amp=amp,
            teacher_amp=teacher_amp, compile=compile, device=device, log_every=log_every,
            save_every_minutes=save_every_minutes, carry_dir=carry_dir, rewarm_steps=rewarm_steps)
        out = train_cm(cfg, resume=None if resume == "none" else resume, max_minutes=max_minutes,
                       until_step=until_step, stop_file=stop_file)
    except ValueError as e:
        fail(str(e))
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if as_json:
        emit_json(out)
    else:
        click.echo(f"stopped at step {out['step']} ({out['reason']}; started at {out['start_step']}, "
                   f"resumed from: {out['resumed_from']}), {out['wall_seconds']} s")


@command.command("cm-bundle")
@click.argument("state", type=click.Path(file_okay=False, exists=True))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--which", type=click.Choice(["ema", "model"]), default="ema", show_default=True)
def cm_bundle(state, out, which) -> None:
    """Write a consistency-distillation state (full or carry) as a zoo folder (fp16 safetensors + configs + card)."""
    from diffquant.zoo.train_cm import bundle_cm

    try:
        click.echo(str(bundle_cm(state, out, which)))
    except ValueError as e:
        fail(str(e))


@command.command("classifier")
@click.option("--train", "train_path", required=True, type=click.Path(), help="Train split (folder, .zip or packed .npz).")
@click.option("--test", "test_path", default=None, type=click.Path(), help="Test split, for the accuracy.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for model.safetensors + config.json.")
@click.option("--epochs", default=70, show_default=True)
@click.option("--batch-size", default=512, show_default=True)
@click.option("--lr", default=0.4, show_default=True)
@click.option("--widths", default="64,128,256,512", show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def classifier(train_path, test_path, out, epochs, batch_size, lr, widths, seed, device, as_json) -> None:
    """Train the fd_cifar feature network (ResNet-9-style) and save it as fp16 safetensors."""
    import time

    import torch

    from diffquant.data import load_images
    from diffquant.zoo.classifier import ClassifierTrainConfig, accuracy, config_dict, save_classifier, train_classifier

    logging.getLogger("diffquant").setLevel(logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        tr = load_images(train_path)
        te = load_images(test_path) if test_path else None
    except ValueError as e:
        fail(str(e))
    cfg = ClassifierTrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, widths=_ints(widths), seed=seed)
    t0 = time.perf_counter()
    model, hist = train_classifier(tr.images, tr.labels, cfg, device=device,
                                   test=(te.images, te.labels) if te is not None else None)
    seconds = time.perf_counter() - t0
    result = {"epochs": epochs, "train_seconds": round(seconds, 1), "final_loss": hist[-1]["loss"],
              "device": torch.cuda.get_device_name() if str(device).startswith("cuda") else "cpu"}
    if te is not None:
        # accuracy of the saved (fp16-rounded) weights, the ones users get
        from diffquant.zoo.classifier import load_classifier

        save_classifier(model, out)
        m16 = load_classifier(out, device)
        result["test_accuracy"] = accuracy(m16, torch.from_numpy(te.images).to(device), torch.from_numpy(te.labels))
    card = {"train_config": config_dict(cfg), "result": result, "history": hist,
            "data": {"train": str(train_path), "test": str(test_path)}}
    save_classifier(model, out, card=card)
    if as_json:
        emit_json(result)
    else:
        click.echo(json.dumps(result))
