"""Checkpoints written under one parallel layout load under another (TP, CP and PP all changed)."""
import json
from pathlib import Path

import pytest

from test_comm_stats import torchrun
from test_equivalence import reference  # noqa: F401  (module fixture: weights, inputs, single-process velocity)

WORKER = Path(__file__).with_name("reshard_worker.py")


def test_tp2_ssp2_checkpoint_loads_under_tp1_ssp4_and_pp2(reference, tmp_path):
    ckpt = tmp_path / "ckpt"
    torchrun(WORKER, 4, ["save", reference, ckpt, "tp2_ssp2:tensor_parallel=2,ssp=2"])
    for nproc, plan in [(4, "ssp4:ssp=4"), (2, "pp2:pipeline_parallel=2")]:
        out = tmp_path / f"{plan.split(':')[0]}.json"
        torchrun(WORKER, nproc, ["load", reference, ckpt, plan, out])
        ranks = json.loads(out.read_text())
        assert all(r["weights_equal"] for r in ranks), ranks
        assert sum(r["n_params"] for r in ranks) >= len(ranks) and all(r["n_params"] > 0 for r in ranks)
        for r in ranks:
            if "velocity_rel" in r:
                assert r["velocity_rel"] <= 1e-5, ranks
