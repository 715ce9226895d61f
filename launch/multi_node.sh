#!/usr/bin/env bash
# Several machines: run this same command on every node. The rendezvous comes from the environment:
#   NNODES        number of nodes                          (required)
#   MASTER_ADDR   host name or IP of the rendezvous node   (required; any node, usually the first)
#   MASTER_PORT   a free port on it                        (default 29500)
#   NPROC         processes (GPUs) per node                (default: all GPUs of the node)
#   RUN_ID        the same id on every node of one run     (default: hsa_train-$MASTER_ADDR-$MASTER_PORT)
# Give every node the same hydra.run.dir on a shared filesystem, e.g.
#   NNODES=4 MASTER_ADDR=gpu-001 launch/multi_node.sh hydra.run.dir=/shared/runs/exp1 train.distributed=fsdp ...
set -euo pipefail
: "${NNODES:?set NNODES}" "${MASTER_ADDR:?set MASTER_ADDR}"
MASTER_PORT="${MASTER_PORT:-29500}"
if [[ -z "${NPROC:-}" ]]; then
    NPROC=$(nvidia-smi -L 2>/dev/null | wc -l || true)
    [[ "${NPROC}" -gt 0 ]] || NPROC=1
fi
exec torchrun --nnodes "${NNODES}" --nproc-per-node "${NPROC}" \
    --rdzv-backend c10d --rdzv-endpoint "${MASTER_ADDR}:${MASTER_PORT}" \
    --rdzv-id "${RUN_ID:-hsa_train-${MASTER_ADDR}-${MASTER_PORT}}" \
    -m hsa_train "$@"
