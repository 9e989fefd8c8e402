"""Every parallel plan equals the single-process run (fp32): velocity, loss and every gradient (gloo, torchrun)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from osp_megatron.config import ModelConfig

from test_comm_stats import torchrun

WORKER = Path(__file__).with_name("equivalence_worker.py")
TOL = 1e-5

# tiny model with 8 heads (head_dim 8) so TP x Ulysses x SSP combinations divide the heads
MODEL = ModelConfig(size="tiny", schedule="dual_end", num_full_blocks=4, num_attention_heads=8, sparse_ratio=2)


def write_reference(model_config, path):
    """One process: the fp32 velocity, loss and gradients of the tiny DiT `model_config` on a padded grid."""
    from osp_megatron.models import build_model
    from osp_megatron.parallel import ParallelState

    torch.manual_seed(0)
    model = build_model(model_config, ParallelState.single(), dtype=torch.float32)
    torch.manual_seed(1)
    # grid (2, 9, 6): H and W not multiples of 4 -> padded token/group layouts
    x = torch.randn(2, 16, 2, 18, 12)
    t = torch.tensor([700.0, 150.0])
    text = torch.randn(2, 6, 32)
    target = torch.randn_like(x)
    with torch.no_grad():
        velocity = model(x, t, text)
    loss = model(x, t, text, target=target)
    loss.backward()
    ref = {
        "model_config": model_config, "state_dict": model.full_state_dict(), "x": x, "t": t, "text": text,
        "target": target, "velocity": velocity, "loss": loss.detach(),
        "grads": {model.global_name(n): p.grad.clone() for n, p in model.named_parameters()},
    }
    torch.save(ref, path)
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return write_reference(MODEL, tmp_path_factory.mktemp("equiv") / "ref.pt")


def _run(reference, nproc, plans, tmp_path, timeout=600):
    out = tmp_path / "out.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    torchrun(WORKER, nproc, [reference, out, *plans], timeout)
    return json.loads(out.read_text())


def _check(results):
    bad = {k: v for k, v in results.items() if any(isinstance(e, float) and e > TOL for e in v.values())}
    assert not bad, json.dumps(results, indent=1)


def test_two_way_plans(reference, tmp_path):
    plans = [
        "tp2:tensor_parallel=2", "tp2_sp:tensor_parallel=2,sequence_parallel=true", "pp2:pipeline_parallel=2",
        "dp2:", "ssp2:ssp=2", "ulysses2:ulysses=2",
    ]
    results = _run(reference, 2, plans, tmp_path)
    assert set(results) == {p.split(":")[0] for p in plans}
    _check(results)


def test_two_way_plans_with_packed_sparse_blocks(reference, tmp_path):
    # model.padding_free=true under CP: packed shards, the SSP switch and the Ulysses all-to-alls on valid rows only
    plans = ["ssp2_packed:ssp=2,padding_free=true", "ulysses2_packed:ulysses=2,padding_free=true",
             "pp2_packed:pipeline_parallel=2,padding_free=true"]
    results = _run(reference, 2, plans, tmp_path)
    assert set(results) == {p.split(":")[0] for p in plans}
    _check(results)


@pytest.mark.slow
def test_four_way_plans_with_packed_sparse_blocks(reference, tmp_path):
    plans = ["ssp4_packed:ssp=4,padding_free=true", "ssp2_ulysses2_packed:ssp=2,ulysses=2,padding_free=true",
             "tp2_ssp2_packed:tensor_parallel=2,ssp=2,padding_free=true"]
    _check(_run(reference, 4, plans, tmp_path))


@pytest.mark.slow
def test_four_way_plans(reference, tmp_path):
    plans = [
        "ssp4:ssp=4", "ssp2_ulysses2:ssp=2,ulysses=2", "tp2_ssp2:tensor_parallel=2,ssp=2",
        "pp2_ssp2:pipeline_parallel=2,ssp=2", "tp2sp_ulysses2:tensor_parallel=2,sequence_parallel=true,ulysses=2",
    ]
    _check(_run(reference, 4, plans, tmp_path))


@pytest.mark.slow
def test_mixed_plan(reference, tmp_path):
    # TP2 (+sequence parallel) x PP2 x SSP2 on 8 processes
    _check(_run(reference, 8, ["tp2sp_pp2_ssp2:tensor_parallel=2,sequence_parallel=true,pipeline_parallel=2,ssp=2"], tmp_path))


@pytest.mark.slow
def test_eight_way_plans_of_the_multi_gpu_benchmarks(reference, tmp_path):
    # issue 9's 8-GPU plans: SSP4 x Ulysses2 (CP 8 > P^2 = 4 classes) and TP2 (+sequence parallel) x SSP4
    plans = ["ssp4_ulysses2:ssp=4,ulysses=2", "tp2sp_ssp4:tensor_parallel=2,sequence_parallel=true,ssp=4",
             "ssp4_ulysses2_packed:ssp=4,ulysses=2,padding_free=true"]
    _check(_run(reference, 8, plans, tmp_path))
