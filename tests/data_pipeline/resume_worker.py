"""Run in a fresh process by test_dp_resume.py: load a loader state, print the next N batches' signatures."""
import hashlib
import json
import sys

import torch

torch.set_num_threads(1)


def signature(batch):
    return {"key": batch["key"], "frames": [m["frame_indices"] for m in batch["meta"]],
            "video": hashlib.sha256(batch["video"].numpy().tobytes()).hexdigest()}


def main():
    config_json, state_path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    from data_pipeline import build_loader
    from data_pipeline.config import BucketSpec, DataConfig

    raw = json.loads(config_json)
    raw["buckets"] = [BucketSpec(**b) for b in raw["buckets"]]
    loader = build_loader(DataConfig(**raw))
    with open(state_path) as f:
        loader.load_state_dict(json.load(f))
    out = []
    for i, batch in enumerate(loader):
        out.append(signature(batch))
        if i + 1 == n:
            break
    print(json.dumps({"batches": out, "metrics": loader.metrics()}))


if __name__ == "__main__":
    main()
