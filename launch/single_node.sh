#!/usr/bin/env bash
# One machine, all its GPUs (or NPROC of them):
#   launch/single_node.sh train.distributed=fsdp model.name_or_path=Qwen/Qwen2.5-0.5B-Instruct data.train_files=[...]
# Every argument is a Hydra override. torchrun restarts nothing here; add train.resume=auto + a fixed
# hydra.run.dir to continue a stopped run.
set -euo pipefail
if [[ -z "${NPROC:-}" ]]; then
    NPROC=$(nvidia-smi -L 2>/dev/null | wc -l || true)
    [[ "${NPROC}" -gt 0 ]] || NPROC=1
fi
exec torchrun --standalone --nproc-per-node "${NPROC}" -m hsa_train "$@"
