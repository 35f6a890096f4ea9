"""GPU checks of the Q-Diffusion block loop (run on the GPU machine: pytest -m gpu)."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # pragma: no cover - CPU CI deselects the gpu marker anyway
    pytest.skip("needs CUDA", allow_module_level=True)


def _run(graphs: bool):
    from diffquant.algorithms.qdiffusion import ReconConfig, qdiffusion_ptq
    from diffquant.calibration.capture import capture_calibration_set
    from diffquant.recipes import build_config
    from diffquant.sampling.samplers import SamplerSpec
    from diffquant.zoo import load as zoo_load

    zm = zoo_load("tiny-random")
    model = zm.model.cuda()
    cal = capture_calibration_set(model, zm.scheduler, num_per_step=8, num_steps=4, spec=SamplerSpec("ddim", 8),
                                  seed=0, batch_size=32, device="cuda", progress=False)
    rc = ReconConfig(weight_iters=40, act_iters=20, batch_size=8, cuda_graphs=graphs)
    q = qdiffusion_ptq(model, build_config(4, 8, weight_estimator="lp", act_estimator="lp"), cal, recon=rc,
                       device="cuda", progress=False)
    x = torch.randn(4, 3, 32, 32, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        return q, q(x, torch.tensor([10, 200, 500, 900], device="cuda")).sample


def test_cuda_graph_loop_matches_eager():
    """The graph-replayed step computes what the eager step computes: same AdaRound codes and
    step sizes up to float noise, same block outputs."""
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    qe, ye = _run(False)
    qg, yg = _run(True)
    se, sg = qe.state_dict(), qg.state_dict()
    assert se.keys() == sg.keys()
    n_w = n_diff = 0
    for k in se:
        if k.endswith(".weight"):
            n_w += se[k].numel()
            n_diff += int((se[k] != sg[k]).sum())
        elif k.endswith("act_quantizer.scale"):
            torch.testing.assert_close(se[k], sg[k], rtol=1e-3, atol=0)
    assert n_diff <= 1e-3 * n_w, f"{n_diff} of {n_w} weights differ"
    err = (ye - yg).pow(2).mean() / ye.pow(2).mean()
    assert err < 1e-4
