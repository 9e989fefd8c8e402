"""slurm/ templates on a real 2-node SLURM cluster: launcher env, SIGUSR1 -> checkpoint -> requeue -> resume,
rerunnable array jobs (osp-shards, osp-cache) that cover every input exactly once."""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from slurm_helpers import REPO, SLURM_DIR, job_env, read_logs

pytestmark = pytest.mark.slurm
WORKER = Path(__file__).with_name("dist_worker.py")


def _attempts(out: Path):
    f = out / "attempts.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.is_file() else []


@pytest.mark.parametrize("launch,nproc", [("task", 1), pytest.param("torchrun", 2, marks=pytest.mark.slow)])
def test_train_template_usr1_checkpoints_requeues_and_resumes(cluster, tmp_path, launch, nproc):
    """2 nodes; the worker holds at step 2 until SIGUSR1 reaches it through `scancel --signal=USR1 --batch`
    -> trap -> srun (-> torchrun); it saves, exits 3; the script requeues; the restart resumes at step 3."""
    out = tmp_path / "run"
    log = tmp_path / "job-%j.out"
    env = {"OSP_LAUNCH": launch, "OSP_NPROC_PER_NODE": str(nproc),
           "OSP_TRAIN_CMD": f"{sys.executable} {WORKER}"}
    job = cluster.sbatch([f"--output={log}", "--time=00:10:00", str(SLURM_DIR / "train.sbatch"),
                          "--out", str(out), "--steps", "5", "--hold-at", "2"], env=env)
    logs = [tmp_path / f"job-{job}.out"]
    world = 2 * nproc
    cluster.wait_for(lambda: all((out / f"holding-{r}").exists() for r in range(world)), 120,
                     "every rank reaching its hold point (signal handlers installed)", job, logs)
    cluster.run(["scancel", "--signal=USR1", "--batch", job])
    states = cluster.wait(job, 240, logs)
    text = read_logs(logs)
    assert states[0]["JobState"] == "COMPLETED", text
    assert states[0]["Restarts"] == "1", text
    attempts = _attempts(out)
    assert [(a["restart"], a["start_step"], a["end_step"], a["exit"]) for a in attempts] == \
        [(0, 0, 3, 3), (1, 3, 5, 0)], text
    for a in attempts:
        assert a["world"] == world and a["allreduce"] == world * (world + 1) / 2
        assert a["master"].startswith("127.0.0.1:")  # NodeAddr of virtual node1, not the unresolvable name
        assert sorted({r["node"] for r in a["ranks"]}) == ["node1", "node2"]
        assert [r["rank"] for r in a["ranks"]] == list(range(world))
        assert [r["local_rank"] for r in a["ranks"]] == [i % nproc for i in range(world)]
    assert "requeueing job" in text and "got SIGUSR1" in text


def test_train_template_failure_is_not_requeued(cluster, tmp_path):
    """A step that fails without a stop request ends the job FAILED with its exit code, no requeue."""
    log = tmp_path / "job-%j.out"
    job = cluster.sbatch([f"--output={log}", "--nodes=1", str(SLURM_DIR / "train.sbatch"), "--out", str(tmp_path),
                          "--steps", "1", "--no-such-flag"], env={"OSP_TRAIN_CMD": f"{sys.executable} {WORKER}"})
    logs = [tmp_path / f"job-{job}.out"]
    states = cluster.wait(job, 120, logs)
    assert states[0]["JobState"] == "FAILED", read_logs(logs)
    assert states[0]["Restarts"] == "0"
    assert states[0]["ExitCode"] == "2:0"  # argparse's exit code, passed through srun and the script


def test_launcher_refuses_to_run_outside_slurm():
    out = subprocess.run([str(SLURM_DIR / "launcher.sh"), "--", "true"], env=job_env(), capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 2 and "not inside a SLURM step" in out.stderr


DEMO = REPO / "configs" / "demo_cpu.yaml"


@pytest.mark.slow
@pytest.mark.skipif(not DEMO.is_file(), reason="configs/demo_cpu.yaml not written yet (training helper)")
def test_train_template_demo_cpu_usr1_requeue_resume(cluster, tmp_path):
    """`sbatch slurm/train.sbatch configs/demo_cpu.yaml` (osp-train on 2 nodes x 1 task): SIGUSR1 to the
    batch shell once training runs -> the trainer checkpoints and exits 3 -> requeue -> the restart resumes from
    `latest` and completes all steps."""
    steps = 20
    run_dir = tmp_path / "run"
    data = tmp_path / "shards"
    made = subprocess.run(["osp-shards", "--synthetic", "8", "--output", str(data), "--workers", "1", "--no-progress"],
                          env=cluster.env, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    log = tmp_path / "job-%j.out"
    job = cluster.sbatch([f"--output={log}", "--time=00:15:00", str(SLURM_DIR / "train.sbatch"), str(DEMO),
                          f"train.run_dir={run_dir}", f"data.shards={data}", "data.num_workers=0",
                          f"train.steps={steps}", "train.warmup_steps=0", "train.save_interval=0",
                          "train.log_interval=1", "train.sample_interval=0", "tracking.backend=none"])
    logs = [tmp_path / f"job-{job}.out"]
    # the trainer's signal handlers are installed before step 1 is logged
    cluster.wait_for(lambda: logs[0].exists() and f"step 1/{steps}" in logs[0].read_text(), 300,
                     "osp-train logging step 1", job, logs)
    cluster.run(["scancel", "--signal=USR1", "--batch", job])
    states = cluster.wait(job, 600, logs)
    text = logs[0].read_text()
    assert states[0]["JobState"] == "COMPLETED", read_logs(logs)
    assert states[0]["Restarts"] == "1", f"SIGUSR1 came after the last step? raise `steps`\n{read_logs(logs)}"
    stopped = re.search(r"stopped at step (\d+) \(signal 10\); checkpointed for requeue", text)
    resumed = re.search(r"resumed at step (\d+)", text)
    assert stopped and resumed, read_logs(logs)
    assert 1 <= int(stopped.group(1)) == int(resumed.group(1)) < steps, read_logs(logs)
    assert f"step {steps}/{steps}" in text, read_logs(logs)
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{steps:07d}", latest


def _make_clips(folder: Path, n: int):
    from data_pipeline.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(str(folder), n, seed=3, workers=1, progress=False)


def _tar_keys(folder: Path):
    keys = []
    for shard in sorted(folder.glob("shard-*.tar")):
        with tarfile.open(shard) as tf:
            keys += sorted({m.name.split(".", 1)[0] for m in tf.getmembers()})
    return keys


def _digest(folder: Path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("parts/part-*/shard-*.tar"))}


def test_array_templates_cover_every_input_once_across_reruns(cluster, tmp_path):
    """shards.sbatch over 3 parts, a full rerun (all parts skipped, bytes unchanged), a rerun of one lost
    part, then cache.sbatch over 2 parts and its rerun: every clip appears exactly once in each output."""
    from data_pipeline.keys import sanitize_key

    clips = tmp_path / "clips"
    paths = _make_clips(clips, 6)
    expected = sorted(sanitize_key(os.path.abspath(p)) for p in paths)
    raw, lat = tmp_path / "raw", tmp_path / "lat"

    def shards(array: str):
        job = cluster.sbatch([f"--array={array}", f"--output={tmp_path}/shards-%A_%a.out",
                              str(SLURM_DIR / "shards.sbatch"), str(clips), str(raw)])
        logs = [tmp_path / f"shards-{job}_*.out"]
        states = cluster.wait(job, 300, logs)
        assert all(s["JobState"] == "COMPLETED" for s in states), read_logs(logs)
        return read_logs(logs)

    shards("0-2")
    assert _tar_keys(raw) == expected
    manifest = json.loads((raw / "manifest.json").read_text())
    assert manifest["num_samples"] == 6 and manifest["parts"] == 3 and manifest["source"] == str(clips)
    before = _digest(raw)

    text = shards("0-2")  # full rerun: nothing redone
    assert text.count("already done; skipping") == 3, text
    assert _digest(raw) == before and _tar_keys(raw) == expected

    import shutil
    shutil.rmtree(raw / "parts" / "part-00001")  # a part lost (or never finished): rerun only that task
    text = shards("1")
    assert "part-00001 of 3: 2 inputs" in text, text
    assert _tar_keys(raw) == expected

    def cache():
        job = cluster.sbatch(["--array=0-1", f"--output={tmp_path}/cache-%A_%a.out", str(SLURM_DIR / "cache.sbatch"),
                              str(raw), str(lat), "--buckets", "5x32x32", "--fps", "8", "--vae", "tiny",
                              "--text-encoder", "tiny"])
        logs = [tmp_path / f"cache-{job}_*.out"]
        states = cluster.wait(job, 300, logs)
        assert all(s["JobState"] == "COMPLETED" for s in states), read_logs(logs)
        return read_logs(logs)

    cache()
    rejected = [json.loads(x)["key"] for x in (lat / "rejects.jsonl").read_text().splitlines()]
    assert sorted(_tar_keys(lat) + rejected) == expected  # each clip exactly once: encoded or rejected
    assert len(_tar_keys(lat)) >= 4, read_logs([tmp_path / "cache-*.out"])
    lat_manifest = json.loads((lat / "manifest.json").read_text())
    assert lat_manifest["num_samples"] == len(_tar_keys(lat)) and lat_manifest["kind"] == "latent"
    text = cache()
    assert text.count("already done; skipping") == 2, text
    assert sorted(_tar_keys(lat) + rejected) == expected


def _launch(env_extra, *args):
    env = {**job_env(), "SLURM_JOB_ID": "4242", "MASTER_ADDR": "10.0.0.1", **env_extra}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    out = subprocess.run([str(SLURM_DIR / "launcher.sh"), *args], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_launcher_task_mode_maps_slurm_ranks():
    """Task 4 of 7 on the third node of `SLURM_STEP_TASKS_PER_NODE=2(x3),1`: local rank 0 of 2 there."""
    out = _launch({"SLURM_PROCID": "4", "SLURM_NTASKS": "7", "SLURM_LOCALID": "0", "SLURM_NODEID": "2",
                   "SLURM_STEP_TASKS_PER_NODE": "2(x3),1", "SLURM_CPUS_PER_TASK": "6", "OMP_NUM_THREADS": ""},
                  "--", "bash", "-c", "echo $RANK $WORLD_SIZE $LOCAL_RANK $LOCAL_WORLD_SIZE $NODE_RANK $MASTER_ADDR "
                                      "$MASTER_PORT ${OMP_NUM_THREADS:-unset}")
    assert out.split() == ["4", "7", "0", "2", "2", "10.0.0.1", str(20000 + 4242 % 20000), "6"]


def test_launcher_torchrun_mode_builds_the_torchrun_command():
    out = _launch({"SLURM_PROCID": "1", "SLURM_NODEID": "1", "SLURM_NNODES": "3", "SLURM_STEP_NUM_NODES": "3",
                   "SLURM_STEP_NUM_TASKS": "3", "TORCHRUN": "echo", "MASTER_PORT": "29999"},
                  "--torchrun", "--nproc-per-node", "4", "--", "osp-train", "cfg.yaml", "train.steps=2")
    assert out.split() == ["--nnodes=3", "--node-rank=1", "--nproc-per-node=4", "--master-addr=10.0.0.1",
                           "--master-port=29999", "--max-restarts=0", "--no-python", "osp-train", "cfg.yaml",
                           "train.steps=2"]
