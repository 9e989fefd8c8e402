"""Mix-GRPO post-training for flow-matching video DiTs (LoRA), as OSP-Next applies it after sparse training.

    osp-grpo configs/grpo_demo_cpu.yaml [key=value ...] [--dry-run]     # CPU demo, minutes
    torchrun --nproc_per_node 8 -m osp_megatron.cli.grpo configs/grpo_osp_14b.yaml

Parts (one idea per file):
    config.py      the `grpo:` section as dataclasses, validated field by field
    windows.py     SDE window schedules (fixed | progressive | random), MixGRPO-Flash grid, NFE accounting
    rollout.py     mixed ODE–SDE rollouts with stored transitions and old log-probs; per-sample noise shared by
                   every rank of a context-parallel group
    rewards.py     videos [b,3,T,H,W] in [-1,1] + prompts -> scores [b]; built-ins, user scorers by path, multi-reward
    advantages.py  per-prompt group (or global) normalisation, clamp, advantage_aggr / reward_aggr
    loss.py        PPO-clip on a trained step, KL to the LoRA-disabled reference
    lora.py        adapters on nn.Linear and megatron Column/Row linears (TP-sharded), disable, merge for export
    trainer.py     the iteration on the shared trainer skeleton (training/loop.py): DP-sharded rollouts, gathered
                   rewards, PPO updates through megatron DDP + optimizer over the LoRA parameters, torch_dist
                   checkpoints of the LoRA state (+ PEFT folders), the pretraining tracker and exit codes
The SDE step, Euler/UniPC/DPM-Solver++ and CFG live in `osp_megatron.diffusion.samplers`.
"""
