"""Where does a torchao bench row spend its time? The bench's torchao rows never finished their first compiled call
within 240-420 s on the H200 (torchao 0.16 and 0.17, torch 2.11; the same models' bf16 compile takes 25-60 s). This
probe builds one torchao variant as the bench does, times it eager (does torchao run at all here, and how fast?),
then compiles it with a watchdog: after ``--dump-after`` seconds every thread's Python stack is printed
(faulthandler) and the process exits, so a stall names the frame it is in. Run it with
``TORCH_LOGS=recompiles,graph_breaks`` to see Dynamo's view as well.

    python benchmarks/torchao_probe.py --model ddpm-cifar10-32 --batch 256 --variant torchao-fp8 --dump-after 150
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import sys
import time

import torch


def main() -> None:
    from diffquant.kernels.bench import build_model, inputs_for, make_variant, time_call
    from diffquant.models.adapter import call_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="ddpm-cifar10-32")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--variant", default="torchao-fp8", choices=("torchao-fp8", "torchao-int8dyn"))
    ap.add_argument("--dump-after", type=float, default=150.0, help="seconds into the compiled first call")
    ap.add_argument("--mode", default=None, help="torch.compile mode (default: the bench's, none)")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("torchao_probe.py needs a CUDA GPU")
    import torchao

    dev = torch.device("cuda")
    res = {"model": a.model, "batch": a.batch, "variant": a.variant, "torchao": torchao.__version__,
           "torch": torch.__version__, "device": torch.cuda.get_device_name()}
    base = build_model(a.model).to(dev)
    calib = inputs_for(base, 1, dev, torch.float32)
    x, t, c = inputs_for(base, a.batch, dev, torch.bfloat16)
    t0 = time.time()
    m = make_variant(base, a.variant, calib, run_inputs=(x, t, c))
    res["build_s"] = round(time.time() - t0, 1)
    res["skipped_layers"] = len(getattr(m, "_torchao_skipped", []))
    with torch.no_grad():
        t0 = time.time()
        call_model(m, x, t, c)
        torch.cuda.synchronize()
        res["eager_first_call_s"] = round(time.time() - t0, 1)
        res["eager_ms"], res["eager_cuda_graph"] = time_call(lambda: call_model(m, x, t, c), reps=10)
    print(json.dumps(res), flush=True)
    faulthandler.dump_traceback_later(a.dump_after, exit=True, file=sys.stdout)
    fm = torch.compile(m, mode=a.mode) if a.mode else torch.compile(m)
    with torch.no_grad():
        t0 = time.time()
        call_model(fm, x, t, c)
        torch.cuda.synchronize()
        res["compiled_first_call_s"] = round(time.time() - t0, 1)
        faulthandler.cancel_dump_traceback_later()
        res["compiled_ms"], res["compiled_cuda_graph"] = time_call(lambda: call_model(fm, x, t, c), reps=20)
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
