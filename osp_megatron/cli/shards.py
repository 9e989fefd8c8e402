"""`osp-shards`: videos (folder or CSV/JSONL manifest) -> size-bounded WebDataset shards + manifest + rejects."""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from data_pipeline.decode import DecoderUnavailable, resolve_decoder
from data_pipeline.filters import FilterConfigError, load_filter_config
from data_pipeline.inputs import InputError, list_inputs
from data_pipeline.sharding import DEFAULT_SHARD_SIZE, ShardOutputError, build_shards, prepare_output
from data_pipeline.synthetic import make_synthetic_dataset


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().rstrip("b")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard-size {text!r}: give bytes, e.g. 1000000000 or 1G or 500M") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="osp-shards",
        description="Probe, filter and pack videos into WebDataset tar shards (OUT/shard-NNNNNN.tar with "
                    ".mp4/.json/.txt members), OUT/manifest.json and OUT/rejects.jsonl. Rerunning resumes.",
    )
    p.add_argument("--input", help="folder of videos (caption in <stem>.txt beside each) or a .csv/.jsonl manifest "
                                   "with path and caption columns")
    p.add_argument("--output", required=True, help="output folder for shards, manifest.json and rejects.jsonl")
    p.add_argument("--config", help="filter YAML: min_duration, max_duration, min_width, min_height, min_fps, "
                                    "max_fps, min_aspect, max_aspect, require_caption")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="probe worker processes (default: cores - 1)")
    p.add_argument("--shard-size", type=_size, default=DEFAULT_SHARD_SIZE,
                   help="maximum video bytes per shard (default 1G; accepts K/M/G suffixes)")
    p.add_argument("--synthetic", type=int, metavar="N",
                   help="first make N synthetic clips (moving shapes, with captions) in OUT/synthetic-clips "
                        "and shard them (used when --input is not given)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic clips")
    p.add_argument("--decoder", default="auto", choices=["auto", "decord", "torchcodec", "pyav"],
                   help="decoder used to probe clips (auto: decord, else torchcodec, else PyAV)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --output folder that is not an earlier osp-shards run, or start "
                        "over in one that is: replaces shard-NNNNNN.tar, manifest.json, rejects.jsonl and "
                        ".osp-shards/ there and leaves every other file alone")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)

    if args.workers < 1:
        print(f"osp-shards: --workers {args.workers}: must be >= 1", file=sys.stderr)
        return 2
    if args.input is None and args.synthetic is None:
        print("osp-shards: give --input DIR|manifest.csv|manifest.jsonl, or --synthetic N", file=sys.stderr)
        return 2
    try:
        flt = load_filter_config(args.config)
        resolve_decoder(args.decoder)
        source, claimed = args.input, False
        if args.synthetic is not None:
            if not args.input:  # the clips go inside --output: claim it first
                prepare_output(args.output, args.overwrite)
                claimed = True
            clips = args.input or os.path.join(args.output, "synthetic-clips")
            make_synthetic_dataset(clips, args.synthetic, seed=args.seed, workers=args.workers,
                                   progress=not args.no_progress)
            source = clips
        inputs = list_inputs(source)
        manifest = build_shards(inputs, args.output, flt, workers=args.workers, shard_size=args.shard_size,
                                progress=not args.no_progress, source=source, decoder=args.decoder,
                                overwrite=args.overwrite and not claimed)
    except (FilterConfigError, InputError, ShardOutputError, DecoderUnavailable, ValueError) as exc:
        print(f"osp-shards: {exc}", file=sys.stderr)
        return 2
    stats = manifest["filter_stats"]
    print(f"osp-shards: {manifest['num_samples']} samples in {manifest['num_shards']} shards "
          f"({manifest['total_duration_s']:.1f} s of video); {stats['rejected']} rejected "
          f"{stats['by_reason'] or ''} -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
