"""One process or many: process-group setup, model wrapping (DDP / FSDP2) and the few collectives the loop needs.

Launch with `torchrun`; `train.distributed=auto` picks DDP when WORLD_SIZE > 1. NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import atexit
import datetime
import os
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import nn

from hsa_train.model.compat import no_split_modules
from hsa_train.types import DISTRIBUTED, check_choice, one_line

SETUP_TIMEOUT_S = 1800.0  # setup's collectives: rank 0 may tokenize a large data set while the others wait


@dataclass
class DistInfo:
    mode: str  # none | ddp | fsdp
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def adopt_submitit_env() -> None:
    """Inside a job of Hydra's submitit launcher the ranks are SLURM tasks, not torchrun workers: export the
    variables torchrun would set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)."""
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and "RANK" not in os.environ:
        from submitit.helpers import TorchDistributedEnvironment

        if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
            TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_mode(mode: str) -> str:
    adopt_submitit_env()
    check_choice("train.distributed", mode, DISTRIBUTED)
    world = env_world_size()
    if mode == "auto":
        return "ddp" if world > 1 else "none"
    if mode == "none" and world > 1:
        raise ValueError(f"train.distributed=none but WORLD_SIZE={world}: use ddp, fsdp or auto under torchrun")
    if mode in ("ddp", "fsdp") and "RANK" not in os.environ:
        raise ValueError(f"train.distributed={mode} needs a torchrun launch (RANK / WORLD_SIZE are not set)")
    return mode


def init(mode: str, device: torch.device) -> DistInfo:
    """Joins the process group (if `mode` is ddp / fsdp) and binds this rank to its GPU."""
    mode = resolve_mode(mode)
    if mode == "none":
        return DistInfo("none")
    join_process_group()
    if device.type == "cuda" and "nccl" not in str(dist.get_backend()):
        raise ValueError("train.device is cuda but the process group has no NCCL backend")
    return DistInfo(mode, dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def join_process_group() -> None:
    """Joins the default process group once per process (a group cannot be re-created after it is destroyed
    under torchrun's shared store). Where CUDA exists the group carries NCCL for GPU tensors and gloo for CPU
    ones, so it serves both the early run-directory agreement and training on either device."""
    if dist.is_initialized():
        return
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=SETUP_TIMEOUT_S))


def set_collective_timeout(seconds: float, info: DistInfo) -> None:
    """From here on a collective that waits `seconds` on a hung or dead peer fails (train.collective_timeout_s);
    setup keeps SETUP_TIMEOUT_S."""
    if info.world > 1:
        dist.distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=seconds))  # the group exists already


_LEFT: list = []  # the groups left, never freed (see `shutdown`)


def shutdown(clean: bool = False) -> None:
    """Leaves the process group; after a clean run the ranks first meet, so none leaves while another still
    talks to it (after a failure they may not all get here: no meeting then). The group object stays referenced
    until the process ends: after a failed collective the last reference is often the DDP reducer in the
    exception's traceback, and freeing it there joins gloo's worker threads while holding the GIL, which the
    worker finishing the failed collective waits for (a deadlock, measured under torch 2.13)."""
    if not dist.is_initialized():
        return
    if clean and dist.get_world_size() > 1:
        dist.barrier()
    _LEFT.append(dist.group.WORLD)
    dist.destroy_process_group()


def leave(code: int) -> NoReturn:
    """Ends a torchrun rank: exit handlers and flushed streams as in a normal exit, then `os._exit`, without the
    interpreter's teardown. Under FSDP the process group outlives `destroy_process_group` (DTensor's caches keep
    its device mesh), so gloo's worker threads still run during that teardown; one that then lets go of a
    collective's tensor takes the GIL, and CPython stops it with an unwind that aborts the process ("terminate
    called without an active exception", pytorch/pytorch#190489). Everything the run writes is written by now."""
    try:
        atexit._run_exitfuncs()  # what a normal exit runs first: logging's flush, temporary folders, trackers
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe: nothing more can be said
                pass
        os._exit(code)


def collective_failed(exc: BaseException) -> bool:
    """A collective that failed on a dead or hung peer (or its timeout): gloo raises a plain RuntimeError that
    names its own source file, NCCL a DistError."""
    return isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and "gloo/" in str(exc))


def rank_device(device: torch.device, info: DistInfo) -> torch.device:
    if device.type == "cuda" and info.mode != "none":
        return torch.device("cuda", info.local_rank)
    return device


def all_reduce_sum(values: list[float], device: torch.device, info: DistInfo) -> list[float]:
    """Sums a few numbers over all ranks (float64, so token counts stay exact)."""
    if info.world == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def on_main(fn, info: DistInfo):
    """Runs `fn` on rank 0 only (a file-system check, a lock) and returns its result there (None elsewhere); if
    it raises, every rank raises the same error, so no rank goes on alone into a collective that would hang."""
    if info.world == 1:
        return fn()
    result, failure = None, [None]
    if info.is_main:
        try:
            result = fn()
        except Exception as exc:  # re-raised on every rank below
            failure = [(type(exc), one_line(exc))]
    dist.broadcast_object_list(failure, src=0)
    if failure[0] is not None:
        kind, message = failure[0]
        raise (kind if issubclass(kind, ValueError) else RuntimeError)(message)
    return result


def all_gather(value, info: DistInfo) -> list:
    """Every rank's `value` (any picklable object), in rank order, on every rank."""
    if info.world == 1:
        return [value]
    out: list = [None] * info.world
    dist.all_gather_object(out, value)
    return out


def barrier(info: DistInfo) -> None:
    if info.world > 1:
        dist.barrier()


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one, found through the model's own no-split module list (the
    decoder-layer classes transformers declares), so no architecture is named here."""
    base = getattr(model, "get_base_model", lambda: model)()
    names = no_split_modules(model) | no_split_modules(base)
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"{type(base).__name__} declares no decoder-layer classes (no-split modules): cannot find its layers to "
            "shard"
        )
    return layers


def wrap(model: nn.Module, info: DistInfo, device: torch.device, mixed_bf16: bool) -> nn.Module:
    """DDP, or FSDP2 (`fully_shard` per decoder layer, then the root). With bf16 on GPU FSDP keeps fp32 master
    weights, computes in bf16 and reduces gradients in fp32."""
    if info.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        return DDP(model, device_ids=ids, find_unused_parameters=False)
    if info.mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_bf16 else None
        kwargs = {"mp_policy": policy} if policy is not None else {}
        for layer in decoder_layers(model):
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The module DDP wraps (FSDP2 shards in place, so there is nothing to unwrap)."""
    return (
        model.module if hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel) else model
    )


def set_gradient_sync(model: nn.Module, info: DistInfo, enabled: bool):
    """A context that skips the gradient all-reduce on micro-batches before the last of a step."""
    from contextlib import nullcontext

    if info.mode == "ddp" and not enabled:
        return model.no_sync()
    if info.mode == "fsdp":
        model.set_requires_gradient_sync(enabled)
    return nullcontext()
