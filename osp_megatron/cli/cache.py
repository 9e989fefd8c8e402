"""`osp-cache`: raw shards -> latent shards (Wan VAE latents + umT5 embeddings), over ranks with torchrun."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from data_pipeline.config import DEFAULT_MAX_FRAME_PIXELS
from data_pipeline.latent_cache import CacheConfig, LatentCacher, parse_buckets
from data_pipeline.shardlist import ShardListError
from osp_megatron.launch import DistEnv


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="osp-cache",
        description="Encode raw video shards (from osp-shards) into latent shards: <key>.latents.pth "
                    "(normalised VAE latents [16,T',H',W']), <key>.text.pth (umT5 embedding [tokens, D]), "
                    "<key>.json, <key>.txt. Run under torchrun to spread shards over ranks; reruns skip "
                    "finished shards.",
        epilog="example: torchrun --nproc-per-node 8 -m osp_megatron.cli.cache --input shards/ --output latents/ "
               "--pipeline /models/Wan2.1-T2V-1.3B-Diffusers "
               "--buckets 81x480x832,81x832x480",
    )
    p.add_argument("--input", required=True, help="raw shard folder, brace pattern or glob")
    p.add_argument("--output", required=True, help="output folder for latent shards + manifest.json")
    p.add_argument("--pipeline", help="a Wan2.1 diffusers pipeline folder: its vae/, text_encoder/ and tokenizer/ "
                                      "(instead of --vae and --text-encoder)")
    p.add_argument("--vae", help="local AutoencoderKLWan folder (or Wan diffusers folder), or 'tiny' (the random "
                                 "demo stand-in); required unless --pipeline")
    p.add_argument("--text-encoder", help="local UMT5 encoder folder (or Wan diffusers folder), or 'tiny' (the random "
                                          "demo stand-in); required unless --pipeline")
    p.add_argument("--tokenizer", help="tokenizer folder (default: next to the text encoder)")
    p.add_argument("--buckets", default="81x480x832",
                   help="FRAMESxHEIGHTxWIDTH list, comma separated (frames 4k+1, sizes multiples of 16)")
    p.add_argument("--fps", type=float, default=16.0, help="sampling fps (default 16)")
    p.add_argument("--sample-window", default="center", choices=["center", "random"],
                   help="which window of a long clip to encode (default center)")
    p.add_argument("--seed", type=int, default=0, help="seed of random windows")
    p.add_argument("--text-len", type=int, default=512, help="text length the loader pads to (Wan: 512)")
    p.add_argument("--text-dim", type=int, help="width of the tiny text encoder (tiny only; default 32)")
    p.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda:N")
    p.add_argument("--dtype", default="float32", help="encoder compute dtype: float32, bfloat16, float16")
    p.add_argument("--save-dtype", default="float32", help="stored dtype: float32, bfloat16, float16")
    p.add_argument("--workers", type=int, default=2, help="decode processes per rank feeding the encoders (0 = none)")
    p.add_argument("--decoder", default="auto", help="video decoder: auto (decord, else torchcodec, else PyAV), "
                                                     "decord, torchcodec or pyav")
    p.add_argument("--max-frame-pixels", type=int, default=DEFAULT_MAX_FRAME_PIXELS,
                   help="skip clips whose stream has more pixels per frame (width x height) as too_large "
                        f"(default {DEFAULT_MAX_FRAME_PIXELS}, 8K)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    env = DistEnv.from_environ()
    rank, world, local = env.rank, env.world_size, env.local_rank
    try:
        cfg = CacheConfig(
            input=args.input, output=args.output, vae=args.vae or args.pipeline or "",
            text_encoder=args.text_encoder or args.pipeline or "",
            tokenizer=args.tokenizer, buckets=parse_buckets(args.buckets), fps=args.fps,
            sample_window=args.sample_window, seed=args.seed, text_len=args.text_len, text_dim=args.text_dim,
            device=args.device, dtype=args.dtype, save_dtype=args.save_dtype, workers=args.workers,
            decoder=args.decoder, max_frame_pixels=args.max_frame_pixels,
        )
        cacher = LatentCacher(cfg, rank, world, local)
    except (ValueError, ShardListError, FileNotFoundError) as exc:
        print(f"osp-cache rank {rank}: {exc}", file=sys.stderr)
        return 2
    summary = cacher.run(progress=not args.no_progress)
    print(f"osp-cache rank {rank}/{world}: {summary['shards_done']} shards encoded, {summary['shards_skipped']} "
          f"already done, {summary['samples']} samples, {summary['rejected']} rejected -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
