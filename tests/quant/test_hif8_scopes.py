"""Which HiF8 amax scope is invariant to which parallel layout (tiny DiT in fp64, HiF8 current scaling on every
linear and on the Q/K/V of self- and cross-attention, gloo, 2 processes):

- local (OSP-Next): an SSP=2 run and a TP=2 run each equal a single-process run that quantizes, piece by piece,
  the same tensors every rank holds (`scope_reference.py`); neither equals the plain single-process run, so the
  local scope is invariant to neither degree.
- tp: TP=2 equals the single-process run: invariant to the TP degree (not to CP: under SSP alone it is local).

fp64 keeps summation-order noise far below HiF8's rounding steps, so codes do not flip between layouts (in fp32
one flipped code early in the model grows to ~1e-2 at the output). "Equal": velocity and loss within 1e-5,
all gradients together within 1e-2 (measured: 7e-8 / 2e-3 for SSP, exact for TP); "differs": > 1e-2 (measured
3e-2 .. 5e-2).
"""
import json
import sys
from pathlib import Path

import pytest
import torch

from osp_megatron.config import ModelConfig, ParallelConfig, PrecisionConfig
from osp_megatron.models import build_model
from osp_megatron.models.transformer_config import make_osp_config
from osp_megatron.parallel import ParallelState
from osp_megatron.quant.recipes import HiF8CurrentScaling

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parallel"))
from test_comm_stats import torchrun  # noqa: E402

from scope_reference import run, segmented_reference  # noqa: E402

WORKER = Path(__file__).with_name("scope_worker.py")
MODEL = ModelConfig(size="tiny", schedule="dual_end", num_layers=6, num_full_blocks=4, attention_backend="math")
GRID = (2, 8, 8)  # patch grid: H, W multiples of P^2 = 4 (no padding)
EQUAL, EQUAL_GRADS, DIFFERS = 1e-5, 1e-2, 1e-2


def write_reference(path):
    precision = PrecisionConfig(dtype="fp32", recipe="hif8_current", quantize_attention=True)
    cfg = make_osp_config(MODEL, ParallelConfig(), precision, torch.float64)
    torch.manual_seed(0)
    model = build_model(cfg, ParallelState.single(), device="cpu")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 2, 16, 16, generator=g, dtype=torch.float64)
    t, text = torch.tensor([600.0]), torch.randn(1, 6, 32, generator=g, dtype=torch.float64)
    target = torch.randn(x.shape, generator=g, dtype=torch.float64)
    refs = {"whole": run(model, x, t, text, target, HiF8CurrentScaling())}
    for plan in ("ssp2", "tp2"):
        refs[plan] = segmented_reference(model, plan, GRID, 2, x, t, text, target)
    torch.save({"model_config": MODEL, "state_dict": model.full_state_dict(), "x": x, "t": t, "text": text,
                "target": target, "references": refs}, path)
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return write_reference(tmp_path_factory.mktemp("scopes") / "ref.pt")


def test_which_scope_is_invariant_to_which_layout(reference, tmp_path):
    out = tmp_path / "out.json"
    plans = ["ssp2_local:ssp2:local", "tp2_local:tp2:local", "tp2_tp:tp2:tp"]
    torchrun(WORKER, 2, [reference, out, *plans], timeout=600)
    r = json.loads(out.read_text())
    # local: each run equals the one-process run of its own pieces, and not the whole-tensor run
    for plan, ref in (("ssp2_local", "ssp2"), ("tp2_local", "tp2")):
        got = r[plan][ref]
        assert got["velocity"] < EQUAL and got["loss"] < EQUAL and got["grads"] < EQUAL_GRADS, (plan, r[plan])
        assert r[plan]["whole"]["velocity"] > DIFFERS and r[plan]["whole"]["grads"] > DIFFERS, (plan, r[plan])
    # tp: invariant to the TP degree (at TP = 1 every scope is the whole-tensor run)
    assert all(r["tp2_tp"]["whole"][k] < EQUAL for k in ("velocity", "loss", "grads")), r["tp2_tp"]
