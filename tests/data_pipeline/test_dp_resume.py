"""Exact resume: state saved mid-epoch, restored in a NEW process, gives the identical continuing sequence."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_pipeline import build_loader
from dp_helpers import raw_config
from resume_worker import signature

HERE = Path(__file__).parent
ROOT = HERE.parent.parent


@pytest.mark.parametrize("workers,mbs", [(0, 2), (2, 2), (3, 1)])
def test_resume_in_new_process_continues_identically(raw_shards, tmp_path, workers, mbs):
    cfg = raw_config(raw_shards, num_workers=workers, micro_batch_size=mbs, shuffle_buffer=4, seed=5)
    stop, more = 5, 9  # 14 batches cross at least one epoch boundary (12 clips)
    loader = build_loader(cfg)
    sigs, state = [], None
    for i, batch in enumerate(loader):
        sigs.append(signature(batch))
        if i + 1 == stop:
            state = json.loads(json.dumps(loader.state_dict()))  # what a checkpoint stores
        if i + 1 == stop + more:
            break
    full_metrics = loader.metrics()
    state_path = tmp_path / "loader_state.json"
    state_path.write_text(json.dumps(state))
    config_json = json.dumps(dataclasses.asdict(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE)]))
    proc = subprocess.run([sys.executable, str(HERE / "resume_worker.py"), config_json, str(state_path), str(more)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert resumed["batches"] == sigs[stop:]
    assert resumed["metrics"]["consumed_batches"] == stop + more
    assert resumed["metrics"]["samples_used"] == full_metrics["samples_used"]
    assert resumed["metrics"]["epochs_completed"] == full_metrics["epochs_completed"] >= 1
    # and a state taken at the start resumes to the very same stream
    assert sigs[:stop] != sigs[stop:stop + stop]


def test_reiterating_the_same_loader_continues(raw_shards):
    cfg = raw_config(raw_shards, num_workers=2, micro_batch_size=2)
    ref = []
    for i, b in enumerate(build_loader(cfg)):
        ref.append(signature(b))
        if i == 6:
            break
    loader = build_loader(cfg)
    got = []
    for i, b in enumerate(loader):  # stop after 3, then a new iterator picks up at batch 4
        got.append(signature(b))
        if i == 2:
            break
    for i, b in enumerate(loader):
        got.append(signature(b))
        if i == 3:
            break
    assert got == ref
