#!/usr/bin/env bash
# Two-process DDP pretraining on CPU (gloo) of the package's pretrain command, with a JSON config (edit its paths):
#   bash training/pretrain_ddp.sh [config.json] [more flags]
# The same config runs under accelerate:
#   accelerate launch --num_processes 2 --cpu -m calm_hf.commands.pretrain --config training/configs/pretrain_ddp_cpu.json
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONFIG="${1:-$HERE/configs/pretrain_ddp_cpu.json}"; shift $(( $# > 0 ? 1 : 0 ))
exec torchrun --nproc_per_node "${NPROC:-2}" -m calm_hf.commands.pretrain --config "$CONFIG" "$@"
