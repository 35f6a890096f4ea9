"""Sharded, resumable, multi-process sampling with a fixed compute batch (diffquant.sampling.large)."""
import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from diffusers import DDPMScheduler, UNet2DModel

from diffquant.models.configs import DDPM_SCHEDULER
from diffquant.sampling import SamplerSpec, load_samples
from diffquant.sampling.large import (
    FixedBatchModel,
    ShardPlan,
    model_fingerprint,
    sample_fixed,
    sample_sharded,
    shard_path,
)
from _unets import tiny_unet_config

TINY = tiny_unet_config()
SPEC = SamplerSpec("ddim", 4)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return UNet2DModel(**dict(TINY, **kw)).eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # CPU numerics depend on the thread count (recorded in the shard metadata); one thread also keeps
    # these tiny forward passes fast on a busy 2-core machine. The gloo workers use one thread too.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


@pytest.fixture(scope="module")
def sched():
    return DDPMScheduler(**DDPM_SCHEDULER)  # epsilon prediction: random weights are chaotic under DDIM


def test_fixed_batch_model_places_rows_in_their_slots(tiny):
    x = torch.randn(10, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.arange(10) * 90
    w = FixedBatchModel(tiny, 4)
    with torch.no_grad():
        ref = torch.cat([tiny(x[i:i + 4], t[i:i + 4]).sample for i in (0, 4)])  # run indices 0..7 in two chunks
        w.offset = 3  # rows are run indices 3..7: slots 3 | 0 1 2 3
        got = w(x[3:8], t[3:8])
    assert w.forwards == 2 and w.padded_rows == 3
    assert torch.equal(got, ref[3:8])
    with pytest.raises(ValueError, match="compute_batch=0"):
        FixedBatchModel(tiny, 0)


@pytest.mark.parametrize("spec", [SPEC, SamplerSpec("ddpm", 4), SamplerSpec("ddim", 4, "quad", eta=1.0)])
def test_samples_identical_across_batch_sizes(tiny, sched, spec):
    runs = {}
    for bs in (1, 7, 64):
        imgs, seeds, floats = sample_fixed(tiny, sched, start=0, stop=11, seed=3, spec=spec, batch_size=bs,
                                           compute_batch=4, return_float=True)
        runs[bs] = (imgs, floats)
        assert seeds.tolist() == list(range(3, 14))
    for bs in (7, 64):
        assert np.array_equal(runs[1][0], runs[bs][0]), f"uint8 samples differ between batch 1 and {bs}"
        assert torch.equal(runs[1][1], runs[bs][1]), f"float samples differ between batch 1 and {bs}"
    # a sub-range of the run is the same samples (what a shard computes)
    part, _, _ = sample_fixed(tiny, sched, start=5, stop=9, seed=3, spec=spec, batch_size=3, compute_batch=4)
    assert np.array_equal(part, runs[1][0][5:9])
    # and the seeds matter
    other, _, _ = sample_fixed(tiny, sched, start=0, stop=11, seed=4, spec=spec, batch_size=64, compute_batch=4)
    assert not np.array_equal(other, runs[64][0])


def test_shard_plan():
    p = ShardPlan(10, seed=100, shard_size=4)
    assert p.num_shards == 3 and p.bounds(2) == (8, 10) and p.seeds(1).tolist() == [104, 105, 106, 107]
    with pytest.raises(ValueError, match="shard_size=0"):
        ShardPlan(10, shard_size=0)
    with pytest.raises(ValueError, match="shard 3 does not exist"):
        p.bounds(3)


class Interrupt(Exception):
    pass


def _kill_after(n):
    done = []

    def cb(k, path):
        done.append(k)
        if len(done) == n:
            raise Interrupt(f"killed after {n} shards")

    return cb


def test_resume_after_interruption_gives_the_same_bytes(tiny, sched, tmp_path):
    kw = dict(num=10, seed=0, spec=SPEC, shard_size=3, compute_batch=4, progress=False)
    full = sample_sharded(tiny, sched, out_dir=tmp_path / "full", out=tmp_path / "full.npz", batch_size=5, **kw)
    assert full.computed == [0, 1, 2, 3] and full.num_shards == 4

    d = tmp_path / "run"
    with pytest.raises(Interrupt):
        sample_sharded(tiny, sched, out_dir=d, out=tmp_path / "r.npz", batch_size=2, on_shard=_kill_after(2), **kw)
    assert shard_path(d, 1).is_file() and not shard_path(d, 2).is_file() and not (tmp_path / "r.npz").exists()
    mtimes = [shard_path(d, k).stat().st_mtime_ns for k in (0, 1)]
    with pytest.raises(ValueError, match="resume"):  # an occupied folder needs --resume
        sample_sharded(tiny, sched, out_dir=d, batch_size=2, **kw)
    res = sample_sharded(tiny, sched, out_dir=d, out=tmp_path / "r.npz", batch_size=7, resume=True, **kw)
    assert res.reused == [0, 1] and res.computed == [2, 3]
    assert [shard_path(d, k).stat().st_mtime_ns for k in (0, 1)] == mtimes  # not redone
    a, sa, ma = load_samples(tmp_path / "full.npz")
    b, sb, mb = load_samples(tmp_path / "r.npz")
    assert np.array_equal(a, b) and a.tobytes() == b.tobytes() and np.array_equal(sa, sb)
    assert sa.tolist() == list(range(10))
    assert ma["images_sha256"] == mb["images_sha256"] == res.images_sha256 == full.images_sha256
    assert mb["shard_seconds"] > 0 and res.meta["shard_seconds"] > 0  # includes the shards of the first attempt
    # resuming a finished run computes nothing and merges the same bytes again
    again = sample_sharded(tiny, sched, out_dir=d, out=tmp_path / "r2.npz", resume=True, **kw)
    assert again.computed == [] and again.images_sha256 == full.images_sha256


def test_resume_verifies_shards(tiny, sched, tmp_path):
    kw = dict(seed=0, spec=SPEC, shard_size=3, compute_batch=4, progress=False, batch_size=4)
    d = tmp_path / "run"
    base = sample_sharded(tiny, sched, num=6, out_dir=d, **kw)
    # a different model, sampler or compute batch in the same folder is refused
    with pytest.raises(ValueError, match="model_fingerprint"):
        sample_sharded(tiny_model(seed=1), sched, num=6, out_dir=d, resume=True, **kw)
    with pytest.raises(ValueError, match="sampler_spec"):
        sample_sharded(tiny, sched, num=6, out_dir=d, resume=True, **{**kw, "spec": SamplerSpec("ddim", 5)})
    with pytest.raises(ValueError, match="compute_batch"):
        sample_sharded(tiny, sched, num=6, out_dir=d, resume=True, **{**kw, "compute_batch": 2})
    # a corrupt shard is recomputed; growing the run recomputes only the shard whose seeds changed
    shard_path(d, 0).write_bytes(b"garbage")
    res = sample_sharded(tiny, sched, num=6, out_dir=d, resume=True, **kw)
    assert res.computed == [0] and res.images_sha256 == base.images_sha256
    res = sample_sharded(tiny, sched, num=8, out_dir=d, resume=True, **{**kw, "shard_size": 3})
    assert res.reused == [0, 1] and res.computed == [2]
    assert np.array_equal(res.images[:6], base.images)
    assert model_fingerprint(tiny) == model_fingerprint(tiny_model()) != model_fingerprint(tiny_model(seed=1))


def _dist_worker(rank, world, init_file, out_dir, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = tiny_model()
        sample_sharded(model, DDPMScheduler(**DDPM_SCHEDULER), num=10, out_dir=out_dir, out=out, seed=0, spec=SPEC,
                       shard_size=3, batch_size=64, compute_batch=4, progress=False)
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_give_the_same_bytes_as_one(tiny, sched, tmp_path):
    import torch.multiprocessing as mp

    one = sample_sharded(tiny, sched, num=10, out_dir=tmp_path / "one", seed=0, spec=SPEC, shard_size=3,
                         batch_size=2, compute_batch=4, progress=False)
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "pg"), str(tmp_path / "two"), str(tmp_path / "two.npz")),
             nprocs=2, join=True)
    imgs, seeds, meta = load_samples(tmp_path / "two.npz")
    assert meta["world_size"] == 2 and seeds.tolist() == list(range(10))
    assert imgs.tobytes() == one.images.tobytes()
    assert meta["images_sha256"] == one.images_sha256
    ranks = {load_samples(shard_path(tmp_path / "two", k))[2]["shard"] % 2 for k in range(4)}
    assert ranks == {0, 1}


def test_cli_sharded_sample_and_resume(tmp_path):
    from diffquant.cli import cli

    out = tmp_path / "s.npz"
    args = ["sample", "zoo:tiny-random", "--steps", "2", "--num", "5", "--seed", "3", "--batch-size", "3",
            "--shard-size", "2", "--compute-batch", "2", "--device", "cpu", "--out", str(out), "--json"]
    r = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["shards"] == 3 and info["shards_computed"] == 3 and info["out_dir"] == str(tmp_path / "s.shards")
    imgs, seeds, meta = load_samples(out)
    assert imgs.shape == (5, 32, 32, 3) and seeds.tolist() == [3, 4, 5, 6, 7] and meta["compute_batch"] == 2
    assert (tmp_path / "s.png").is_file()
    r = CliRunner().invoke(cli, args, catch_exceptions=False)  # no --resume: refused
    assert r.exit_code != 0 and "--resume" in r.output
    os.remove(shard_path(tmp_path / "s.shards", 1))
    r = CliRunner().invoke(cli, args[:-1] + ["--resume", "--batch-size", "5", "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    info2 = json.loads(r.stdout)
    assert info2["shards_computed"] == 1 and info2["shards_reused"] == 2
    assert info2["images_sha256"] == info["images_sha256"]


def test_torchrun_cli_two_processes_same_bytes_as_one(tmp_path):
    """`torchrun -m diffquant.cli sample` (gloo, 2 CPU processes) merges the same bytes as one process."""
    import shutil
    import subprocess
    import sys

    from diffquant.cli import cli

    torchrun = shutil.which("torchrun") or str(os.path.join(os.path.dirname(sys.executable), "torchrun"))
    common = ["--steps", "2", "--shard-size", "2", "--compute-batch", "2", "--device", "cpu", "--no-grid", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same thread count as this process (see one_thread)
    r = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "diffquant.cli", "sample",
                        "zoo:tiny-random", "--num-samples", "6", "--batch-size", "4", "--out", str(tmp_path / "two.npz"),
                        *common], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.loads(r.stdout[r.stdout.index("{"):])
    assert two["world_size"] == 2 and two["shards"] == 3
    r1 = CliRunner().invoke(cli, ["sample", "zoo:tiny-random", "--num", "6", "--batch-size", "1",
                                  "--out", str(tmp_path / "one.npz"), *common], catch_exceptions=False)
    assert r1.exit_code == 0, r1.output
    one = json.loads(r1.stdout)
    assert one["world_size"] == 1 and one["images_sha256"] == two["images_sha256"]
    assert load_samples(tmp_path / "one.npz")[0].tobytes() == load_samples(tmp_path / "two.npz")[0].tobytes()
