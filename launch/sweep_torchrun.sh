#!/usr/bin/env bash
# A sweep of multi-GPU jobs on one machine, without SLURM: each setting is one torchrun run on all GPUs (or NPROC),
# one after another, in SWEEP_DIR/<n>/; then the summary table (summary.md / summary.csv) as a Hydra sweep writes.
#   launch/sweep_torchrun.sh multirun/noise "hsa.lambdas.PROCESS_NOISE=0.0" "hsa.lambdas.PROCESS_NOISE=0.2" \
#       -- train.distributed=fsdp model.name_or_path=Qwen/Qwen2.5-0.5B-Instruct
# Each quoted argument before `--` is one setting (one or more overrides); everything after `--` goes to every run.
# A failed run does not stop the others; the script exits 1 if any failed. Set METRIC / DIRECTION to sort the
# summary (default eval_loss / minimize). Never put torchrun around `python -m hsa_train -m` instead.
set -uo pipefail
[[ $# -ge 2 ]] || { echo "usage: $0 SWEEP_DIR 'overrides of setting 1' ['setting 2' ...] [-- common overrides]" >&2; exit 2; }
sweep_dir=$1
shift
settings=()
while [[ $# -gt 0 && "$1" != "--" ]]; do settings+=("$1"); shift; done
[[ "${1:-}" == "--" ]] && shift
common=("$@")
if [[ -z "${NPROC:-}" ]]; then
    NPROC=$(nvidia-smi -L 2>/dev/null | wc -l || true)
    [[ "${NPROC}" -gt 0 ]] || NPROC=1
fi
failed=0
for i in "${!settings[@]}"; do
    read -r -a overrides <<< "${settings[$i]}"
    echo "== run $i: ${settings[$i]}"
    torchrun --standalone --nproc-per-node "${NPROC}" -m hsa_train "${overrides[@]}" "${common[@]}" \
        "hydra.run.dir=${sweep_dir}/${i}" || { echo "== run $i failed" >&2; failed=1; }
done
python -m hsa_train.sweep "${sweep_dir}" --metric "${METRIC:-eval_loss}" --direction "${DIRECTION:-minimize}"
exit "${failed}"
