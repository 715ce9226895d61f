"""First-GPU check: does hsa_train train, compile, agree, scale, generate and shard on this machine? One command,
at most 8 minutes on one H100, every phase in its own subprocess with its own timeout, so one failure is reported
and the next phase still runs.

    python benchmarks/gpu_check.py                         # CUDA when there is one: every phase, about 5-8 min
    python benchmarks/gpu_check.py --device cpu --quick    # what runs on CPU, small sizes (about 1.5 min on 2 cores)
    python benchmarks/gpu_check.py --phases P0,P3 --out /tmp/check --strict

Writes `gpu_check.json` (every phase: status ok / failed / skipped / timeout, seconds, data, checks, error tail)
and `gpu_check.md` (one row per phase) into `--out` (default benchmarks/results/), rewritten after every phase;
each worker's full output goes to `--out`/gpu_check_logs/. `--strict` exits 1 when a phase failed or timed out.

- P0: versions (python, torch, CUDA, triton, transformers, hsa_train and its git commit) and the device.
- P1: a tiny Qwen2 (14 query / 2 key-value heads, 2 layers; head dim 64 on CUDA, 16 on CPU) with HSA on
  `backend=auto` (flex on CUDA, sdpa on CPU), fp32 weights under bf16 autocast. 3 AdamW steps in each of four modes
  (plain, activation checkpointing, learnable λ, learnable λ + checkpointing), then an eval forward (no grad), then
  a train step and an eval forward at a second sequence length. Records the kernels that ran and the dtypes of the
  q / k / v they got, losses, λ gradients, CUDA syncs per forward (`torch.cuda.set_sync_debug_mode("warn")`, the
  warnings counted; the stock model's forward on the same batch as the reference; null on CPU), dynamo graphs
  compiled and graph breaks per step, and whether dynamo's recompile limit was hit (its warning, caught).
- P2: numerics: eager, sdpa and flex in fp32 and under bf16 autocast against fp32 eager on the same weights and the
  same (padded) batch: max abs difference of the logits (real tokens) and of the loss, each against a tolerance.
- P3: one attention call (benchmarks/attention.py's `make_call`: mask, bias and kernel built inside the timed call)
  at 4k / 8k / 16k tokens (B = 1, 16 query / 4 key-value heads, head dim 128, bf16 on CUDA): sdpa causal (stock),
  flex causal (stock flex + causal block mask), HSA sdpa, HSA flex, HSA flex with learnable λ. Forward and backward
  timed separately in one pass, variants interleaved per repeat; medians, per-repeat ratios to sdpa causal, peak
  memory above the inputs (torch.cuda.max_memory_allocated). On CPU: fp32, flex forward only (its backward needs
  CUDA), learnable-λ flex skipped.
- P4: greedy generation on the tiny model (fp32) with a dynamic and a static cache per backend (auto, flex on CUDA,
  eager) against sdpa with a dynamic cache: tokens equal, seconds per decoding step (first call, with compilation,
  and a second call), dynamo graphs compiled by each.
- P5: FSDP2 (`fully_shard` per decoder layer, then the root; bf16 params / fp32 reduce on CUDA) on one rank (NCCL on
  CUDA, gloo on CPU): 2 steps with learnable λ; finite losses, finite non-zero λ gradients.
- P6: QLoRA as a run builds it (model.quantization=4bit: `loading.load_pretrained` with NF4, double quantisation
  and bf16 compute, then `lora.trainable_parts`): the tiny Qwen2 saved and loaded 4-bit onto the device, HSA with
  learnable λ on `backend=auto`, LoRA on every linear layer; 3 steps under bf16 autocast on CUDA, an evaluation
  forward, then a 4th step (training after an evaluation). Finite losses, finite non-zero λ and adapter
  gradients, λ kept in fp32, the 4-bit layers counted, the kernels that ran, peak memory on CUDA.

How the kernel inputs are seen: before transformers or hsa_train is imported, each worker replaces
`torch.nn.attention.flex_attention.flex_attention` and `torch.nn.functional.scaled_dot_product_attention` with thin
wrappers that report (kernel, compiled or eager, q / k / v dtypes, mask) and call the original. hsa_train's flex
backend compiles the wrapper, and dynamo inlines it: the report goes through a function registered in
`torch._dynamo.config.reorderable_logging_functions`, which dynamo calls after the graph on every run without a
graph break or a guard, so the wrapper adds no graph and no recompile. "flex (eager)" means flex ran unfused (not
compiled: flex's CPU path for λ gradients, or a frame dynamo gave up on).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import logging
import math
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PHASES = ("P0", "P1", "P2", "P3", "P4", "P5", "P6")
TITLES = {
    "P0": "versions and device",
    "P1": "tiny Qwen2 training (auto backend, bf16 autocast)",
    "P2": "numerics against fp32 eager",
    "P3": "attention benchmark",
    "P4": "generation (dynamic / static cache)",
    "P5": "FSDP2, one rank",
    "P6": "QLoRA: a 4-bit base under LoRA with learnable λ",
}
# (timeout, seconds kept back for it while earlier phases run) per phase, by device; the whole run fits --budget
TIMEOUTS = {
    "cuda": {
        "P0": (45, 10),
        "P1": (150, 45),
        "P2": (90, 25),
        "P3": (180, 60),
        "P4": (120, 30),
        "P5": (75, 25),
        "P6": (75, 25),
    },
    "cpu": {
        "P0": (60, 15),
        "P1": (180, 30),
        "P2": (180, 30),
        "P3": (240, 40),
        "P4": (180, 30),
        "P5": (120, 30),
        "P6": (120, 30),
    },
}
BUDGET = {"cuda": 470, "cpu": 900}
LAMBDAS = {"GLOBAL_CONDITION": 0.0, "KEY_EVENT": 0.01, "PROCESS_NOISE": 0.1}


# ----------------------------------------------------------------------------------------------------------------
# the parent: one subprocess per phase, results appended as they come
# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda if available")
    parser.add_argument("--quick", action="store_true", help="small sizes (CPU-sized lengths, fewer repeats)")
    parser.add_argument("--phases", default=",".join(PHASES), help="comma-separated, e.g. P0,P2")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder for gpu_check.json / .md")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a phase failed or timed out")
    parser.add_argument("--budget", type=float, default=None, help="seconds for the whole run (470 on CUDA)")
    parser.add_argument("--phase-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result-file", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.phases = [p.strip().upper() for p in args.phases.split(",") if p.strip()]
    unknown = [p for p in args.phases if p not in PHASES]
    if unknown:
        parser.error(f"--phases: unknown {', '.join(unknown)}; choose from {', '.join(PHASES)}")
    return args


def resolve_device(requested: str | None) -> str:
    if requested:
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def tail(text: str, n: int = 3000) -> str:
    return text if len(text) <= n else "..." + text[-n:]


def run_phase(phase: str, args, device: str, timeout: float, log_dir: Path) -> dict:
    """Runs one phase's worker and returns its record (status, seconds, data, checks, error)."""
    result_file = log_dir / f"{phase}.result.json"
    log_file = log_dir / f"{phase}.log"
    result_file.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--phase-worker", phase, "--device", device]
    command += ["--result-file", str(result_file), "--deadline", str(time.time() + timeout - 5)]
    command += ["--quick"] if args.quick else []
    env = dict(os.environ, PYTHONFAULTHANDLER="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])
    start = time.perf_counter()
    timed_out = False
    with open(log_file, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the worker's own session: it and its compile workers
            rc = proc.wait()
    seconds = time.perf_counter() - start
    output = log_file.read_text(errors="replace")
    record = {"status": None, "seconds": round(seconds, 2), "data": {}, "checks": [], "error": None}
    if result_file.exists():
        with contextlib.suppress(json.JSONDecodeError):
            record.update(json.loads(result_file.read_text()))
    record["seconds"] = round(seconds, 2)
    record["returncode"] = rc
    if timed_out:
        record["status"] = "timeout"
        record["error"] = f"killed after {timeout:.0f} s (data holds what it had finished)\n" + tail(output, 2500)
    elif record["status"] in (None, "running"):
        record["status"] = "failed"
        record["error"] = (record.get("error") or "") + f"worker exited with {rc}\n" + tail(output, 2500)
    elif record["status"] == "failed" and not record.get("error"):
        record["error"] = tail(output, 1500)
    result_file.unlink(missing_ok=True)
    return record


def phase_timeouts(device: str, selected: list[str], remaining: float, phase: str) -> float:
    later = [p for p in PHASES if p in selected and PHASES.index(p) > PHASES.index(phase)]
    reserve = sum(TIMEOUTS[device][p][1] for p in later)
    return min(TIMEOUTS[device][phase][0], remaining - reserve)


def headline(record: dict) -> str:
    data = record.get("data") or {}
    text = data.get("summary") or ""
    failed = [c["name"] for c in record.get("checks", []) if c.get("ok") is False]
    if failed:
        text += ("; " if text else "") + "failed: " + ", ".join(failed)
    if record["status"] == "timeout":
        text += ("; " if text else "") + f"killed after {record.get('timeout_s', '?')} s" + where_stuck(record["error"])
    elif record["status"] == "failed" and record.get("error") and not failed:
        lines = [line for line in record["error"].strip().splitlines() if line.strip()]
        text += ("; " if text else "") + (lines[-1][:200] if lines else "")
    return text.replace("|", "/").replace("\n", " ")


def where_stuck(log: str | None) -> str:
    """The innermost project frame of the faulthandler dump a timed-out worker printed: ', in flex.py:131 _flex'."""
    for line in (log or "").splitlines():  # faulthandler lists the most recent call first
        match = re.search(r'File "(.+)", line (\d+) in (\S+)', line)
        if match and ("/hsa_train/" in match[1] or "/benchmarks/" in match[1]):
            return f", in {Path(match[1]).name}:{match[2]} {match[3]}"
    return ""


def markdown(report: dict) -> str:
    meta = report["meta"]
    lines = [
        f"## gpu_check: {meta['device_name']} ({meta['device']}{', quick' if meta['quick'] else ''})",
        "",
        f"{meta['started']}, hsa_train {meta.get('commit') or '?'}, total {meta.get('total_seconds', 0):.0f} s",
        "",
        "| phase | what | status | seconds | key figures |",
        "|---|---|---|---|---|",
    ]
    for phase in PHASES:
        rec = report["phases"].get(phase)
        if rec is None:
            continue
        lines.append(f"| {phase} | {TITLES[phase]} | {rec['status']} | {rec['seconds']:.1f} | {headline(rec)} |")
    p3 = (report["phases"].get("P3") or {}).get("data", {}).get("lengths")
    if p3:
        names = list(next(iter(p3.values()))["variants"])
        lines += ["", f"P3, forward+backward ms (x sdpa causal), peak MiB ({report['phases']['P3']['data']['setup']}):"]
        lines += ["", "| tokens | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for L, row in p3.items():
            cells = []
            for name in names:
                v = row["variants"][name]
                if "skipped" in v:
                    cells.append(v["skipped"])
                    continue
                ms = v.get("total_ms_median") or v.get("forward_ms_median")
                part = "" if v.get("total_ms_median") else " (fwd)"
                ratio = v.get("ratio_total_to_sdpa_causal") or v.get("ratio_forward_to_sdpa_causal")
                mem = f", {v['peak_mib']:.0f} MiB" if v.get("peak_mib") is not None else ""
                cells.append(f"{ms:.2f}{part} (x{ratio:.2f}){mem}" if ratio else f"{ms:.2f}{part}{mem}")
            lines.append(f"| {L} | " + " | ".join(cells) + " |")
    bad = [(p, c) for p in PHASES for c in (report["phases"].get(p) or {}).get("checks", []) if c.get("ok") is False]
    if bad:
        lines += ["", "Failed checks:", ""]
        lines += [f"- {p} {c['name']}: {str(c.get('detail', ''))[:300]}" for p, c in bad]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "gpu_check.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, default=str))
    tmp.replace(out / "gpu_check.json")
    (out / "gpu_check.md").write_text(markdown(report))


def git_commit() -> str | None:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True)  # fmt: skip
    except OSError:
        return None
    if sha.returncode:
        return None
    return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.phase_worker:
        return worker(args)
    device = resolve_device(args.device)
    budget = args.budget or BUDGET[device]
    out: Path = args.out
    log_dir = out / "gpu_check_logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    report = {
        "meta": {
            "device": device,
            "device_name": device,
            "quick": args.quick,
            "phases_selected": args.phases,
            "budget_s": budget,
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "commit": git_commit(),
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        },
        "phases": {},
    }
    for phase in PHASES:
        if phase not in args.phases:
            report["phases"][phase] = {"status": "skipped", "seconds": 0.0, "data": {"summary": "not selected"},
                                       "checks": [], "error": None}  # fmt: skip
            continue
        remaining = budget - (time.perf_counter() - start)
        timeout = phase_timeouts(device, args.phases, remaining, phase)
        if timeout < 15:
            record = {"status": "skipped", "seconds": 0.0, "data": {"summary": f"time budget ({budget:.0f} s) spent"},
                      "checks": [], "error": None}  # fmt: skip
        else:
            print(f"gpu_check {phase} ({TITLES[phase]}), timeout {timeout:.0f} s ...", flush=True)
            record = run_phase(phase, args, device, timeout, log_dir)
        record["timeout_s"] = round(timeout, 1)
        report["phases"][phase] = record
        if phase == "P0" and record.get("data", {}).get("device_name"):
            report["meta"]["device_name"] = record["data"]["device_name"]
        report["meta"]["total_seconds"] = round(time.perf_counter() - start, 1)
        write_report(report, out)
        print(f"gpu_check {phase}: {record['status']} in {record['seconds']:.1f} s  {headline(record)}", flush=True)
    report["meta"]["total_seconds"] = round(time.perf_counter() - start, 1)
    write_report(report, out)
    print(markdown(report))
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    bad = [p for p, r in report["phases"].items() if r["status"] in ("failed", "timeout")]
    return 1 if args.strict and bad else 0


# ----------------------------------------------------------------------------------------------------------------
# the worker side: spies, counters, helpers
# ----------------------------------------------------------------------------------------------------------------

KERNELS: Counter = Counter()  # (kernel, how, q dtype, k dtype, v dtype, mask) -> calls


def _record_kernel(*key) -> None:
    KERNELS[key] += 1


def install_spies() -> None:
    """Wraps flex_attention and scaled_dot_product_attention (see the module docstring). Must run before
    transformers / hsa_train import them by name."""
    import torch
    import torch.nn.attention.flex_attention as flex_module
    import torch.nn.functional as F

    torch._dynamo.config.reorderable_logging_functions.add(_record_kernel)
    flex, sdpa = flex_module.flex_attention, F.scaled_dot_product_attention

    def flex_spy(query, key, value, *args, **kwargs):
        how = "compiled" if torch.compiler.is_compiling() else "eager"
        _record_kernel("flex", how, str(query.dtype), str(key.dtype), str(value.dtype), "block_mask")
        return flex(query, key, value, *args, **kwargs)

    def sdpa_spy(query, key, value, attn_mask=None, *args, **kwargs):
        how = "compiled" if torch.compiler.is_compiling() else "eager"
        if attn_mask is not None:
            mask = f"mask {str(attn_mask.dtype).removeprefix('torch.')}"
        else:
            mask = "is_causal" if kwargs.get("is_causal") or (len(args) > 1 and args[1]) else "none"
        _record_kernel("sdpa", how, str(query.dtype), str(key.dtype), str(value.dtype), mask)
        return sdpa(query, key, value, attn_mask, *args, **kwargs)

    flex_spy.__doc__, sdpa_spy.__doc__ = flex.__doc__, sdpa.__doc__
    flex_module.flex_attention = flex_spy
    F.scaled_dot_product_attention = sdpa_spy
    torch.nn.functional.scaled_dot_product_attention = sdpa_spy


def take_kernels() -> list[dict]:
    """The kernel calls seen since the last call, one entry per distinct (kernel, how, dtypes, mask)."""
    seen = [
        {"kernel": k[0], "how": k[1], "q": k[2][6:], "k": k[3][6:], "v": k[4][6:], "mask": k[5], "calls": n}
        for k, n in sorted(KERNELS.items())
    ]
    KERNELS.clear()
    return seen


class RecompileLimitWatch(logging.Handler):
    """Catches dynamo's 'hit config.recompile_limit' warning (dynamo then runs the frame uncompiled)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.hits: list[str] = []
        self._seen: set[int] = set()

    def emit(self, record: logging.LogRecord) -> None:
        if id(record) in self._seen:  # attached to a logger and its parent: one record, seen twice
            return
        self._seen.add(id(record))
        message = record.getMessage()
        if "recompile_limit" in message or "cache_size_limit" in message:
            self.hits.append(message.splitlines()[0] + " | " + " ".join(message.splitlines()[1:3]).strip())


WATCH = RecompileLimitWatch()


def dynamo_state() -> dict:
    from torch._dynamo.utils import counters

    return {
        "graphs": int(counters["stats"]["unique_graphs"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
        "limit_hits": len(WATCH.hits),
    }


def dynamo_delta(before: dict) -> dict:
    now = dynamo_state()
    return {k: now[k] - before[k] for k in now}


def graph_break_reasons() -> dict:
    from torch._dynamo.utils import counters

    return {str(k)[:300]: int(v) for k, v in counters["graph_break"].items()}


@contextlib.contextmanager
def count_syncs(device):
    """Yields a dict whose "syncs" is, after the block, the number of synchronizing CUDA operations it ran (None on
    CPU), and "where" the first few places (file:line of the Python caller)."""
    import torch

    box = {"syncs": None, "where": []}
    if device.type != "cuda":
        yield box
        return
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield box
        finally:
            torch.cuda.set_sync_debug_mode("default")
    hits = [w for w in caught if "synchroniz" in str(w.message)]
    box["syncs"] = len(hits)
    box["where"] = list(dict.fromkeys(f"{Path(w.filename).name}:{w.lineno}" for w in hits))[:6]


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def autocast(device, enabled: bool = True):
    import torch

    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


class Phase:
    """A worker's record: data and checks, saved after every step so a timeout keeps what was done."""

    def __init__(self, path: Path | None, deadline: float | None):
        self.path, self.deadline = path, deadline or (time.time() + 3600)
        self.data: dict = {}
        self.checks: list[dict] = []
        self.status = "running"
        self.error: str | None = None

    def check(self, name: str, ok: bool | None, detail=None) -> bool | None:
        self.checks.append({"name": name, "ok": None if ok is None else bool(ok), "detail": detail})
        self.save()
        return ok

    def left(self) -> float:
        return self.deadline - time.time()

    def save(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_suffix(".tmp")
        payload = {"status": self.status, "data": self.data, "checks": self.checks, "error": self.error}
        tmp.write_text(json.dumps(payload, indent=1, default=str))
        tmp.replace(self.path)


def finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def qwen2_config(device, **overrides):
    """The tiny Qwen2 of P1 / P2 / P4 / P5: 14 query and 2 key-value heads like Qwen2.5-0.5B, 2 layers; head dim 64
    on CUDA (hidden 896), 16 on CPU (hidden 224)."""
    from transformers import Qwen2Config

    head_dim = 64 if device.type == "cuda" else 16
    settings = dict(
        vocab_size=1024 if device.type == "cuda" else 512, hidden_size=14 * head_dim,
        intermediate_size=2 * 14 * head_dim, num_hidden_layers=2, num_attention_heads=14, num_key_value_heads=2,
        max_position_embeddings=4096, attention_dropout=0.0, tie_word_embeddings=False, bos_token_id=None,
        eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    settings.update(overrides)
    return Qwen2Config(**settings)


def stock_model(config, device, seed: int = 0):
    import torch
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).to(device)


def hsa_model(stock, backend: str, learnable=False):
    from hsa_train.model import enable_hsa

    return enable_hsa(copy.deepcopy(stock), LAMBDAS, backend, learnable=learnable)


def typed_spans(rows: int, length: int, generator, n_types: int = 3):
    """Semantic ids in runs of 4-48 tokens of one type (messages), the first run GLOBAL_CONDITION."""
    import torch

    out = torch.empty(rows, length, dtype=torch.long)
    for r in range(rows):
        pos, t = 0, 0
        while pos < length:
            n = int(torch.randint(4, 49, (1,), generator=generator))
            out[r, pos : pos + n] = t
            pos += n
            t = int(torch.randint(1, n_types, (1,), generator=generator))
    return out


def make_batch(config, device, rows: int, length: int, pad: int, seed: int = 0, pad_type: int = 2) -> dict:
    """A training batch: random tokens, typed spans, the last row right-padded by `pad` tokens (labels -100 there,
    padding typed with the default type, as the collator does)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, config.vocab_size, (rows, length), generator=g)
    semantic_ids = typed_spans(rows, length, g)
    attention_mask = torch.ones(rows, length, dtype=torch.long)
    if pad:
        attention_mask[-1, length - pad :] = 0
        input_ids[-1, length - pad :] = config.pad_token_id
        semantic_ids[-1, length - pad :] = pad_type
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "semantic_ids": semantic_ids}
    return {k: v.to(device) for k, v in batch.items()}


def enable_checkpointing(model) -> str:
    """Activation checkpointing, non-reentrant (as hsa_train's runs use it); transformers 5 renamed the switch."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        return "activation_checkpointing_enable(use_reentrant=False)"
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return "gradient_checkpointing_enable(use_reentrant=False)"


def lambda_grad(model) -> list | None:
    raw = getattr(getattr(model, "hsa", None), "raw", None)
    if raw is None or raw.grad is None:
        return None
    grad = raw.grad
    grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
    return [float(x) for x in grad.detach().float().flatten().cpu()]


def lambda_values(model) -> list | None:
    raw = getattr(getattr(model, "hsa", None), "raw", None)
    if raw is None:
        return None
    raw = raw.full_tensor() if hasattr(raw, "full_tensor") else raw
    return [round(float(x), 6) for x in raw.detach().float().flatten().cpu()]


def kernel_dtypes_ok(kernels: list[dict], want: str) -> bool:
    return bool(kernels) and all(k["q"] == k["k"] == k["v"] == want for k in kernels)


def describe(kernels: list[dict]) -> str:
    """Kernel calls merged over steps: `sdpa[eager] q/k/v bfloat16/bfloat16/bfloat16 (mask bfloat16) x6`."""
    merged: Counter = Counter()
    for k in kernels:
        merged[f"{k['kernel']}[{k['how']}] q/k/v {k['q']}/{k['k']}/{k['v']} ({k['mask']})"] += k["calls"]
    return ", ".join(f"{name} x{n}" for name, n in merged.items())


# ----------------------------------------------------------------------------------------------------------------
# the phases
# ----------------------------------------------------------------------------------------------------------------


def package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def phase_p0(ph: Phase, device, quick: bool) -> None:
    import torch
    import transformers

    import hsa_train

    data = ph.data
    data.update(
        python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        transformers=transformers.__version__, hsa_train=package_version("hsa_train"),
        hsa_train_path=str(Path(hsa_train.__file__).parent), commit=git_commit(), platform=platform.platform(),
        cpu_threads=torch.get_num_threads(),
    )  # fmt: skip
    with contextlib.suppress(ImportError):
        import triton

        data["triton"] = triton.__version__
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        smi = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        data["driver"] = subprocess.run(smi, capture_output=True, text=True, timeout=20).stdout.strip() or None
    if device.type == "cuda":
        ok = torch.cuda.is_available()
        ph.check("CUDA available", ok, None if ok else "torch.cuda.is_available() is False")
        if not ok:
            return
        props = torch.cuda.get_device_properties(0)
        data.update(
            device_name=props.name, capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count,
            device_count=torch.cuda.device_count(), bf16_supported=torch.cuda.is_bf16_supported(),
        )  # fmt: skip
        ph.check("bf16 supported", data["bf16_supported"])
    else:
        data["device_name"] = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    mem = f", {data['memory_gib']} GiB, sm {data['capability']}" if "memory_gib" in data else ""
    data["summary"] = (f"{data['device_name']}{mem}; torch {data['torch']} (CUDA {data['cuda']}), transformers "
                       f"{data['transformers']}, hsa_train {data['commit']}")  # fmt: skip


def train_steps(ph: Phase, model, batch, device, steps: int, out: dict) -> dict:
    """`steps` AdamW steps under bf16 autocast, recorded into `out` (saved after each step): per step loss, λ
    gradient, syncs in forward and in backward, dynamo graphs compiled, graph breaks, kernels, seconds."""
    import torch

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    out.update(losses=[], lambda_grads=[], steps=[])
    for _ in range(steps):
        before = dynamo_state()
        take_kernels()
        t0 = time.perf_counter()
        with count_syncs(device) as fwd_syncs, autocast(device):
            loss = model(**batch).loss
        with count_syncs(device) as bwd_syncs:
            loss.backward()
        grad = lambda_grad(model)
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = float(loss)
        sync(device)
        out["losses"].append(value)
        out["lambda_grads"].append(grad)
        out["steps"].append({
            "seconds": round(time.perf_counter() - t0, 4), "loss": value, "syncs_forward": fwd_syncs["syncs"],
            "syncs_backward": bwd_syncs["syncs"], "sync_sites": fwd_syncs["where"] + bwd_syncs["where"],
            **dynamo_delta(before), "kernels": take_kernels(),
        })  # fmt: skip
        ph.save()
    out["lambdas_after"] = lambda_values(model)
    return out


def forward_only(model, batch, device) -> dict:
    import torch

    before = dynamo_state()
    take_kernels()
    model.eval()
    t0 = time.perf_counter()
    with torch.no_grad(), count_syncs(device) as syncs, autocast(device):
        loss = model(**batch).loss
    value = float(loss)
    return {"loss": value, "seconds": round(time.perf_counter() - t0, 4), "syncs_forward": syncs["syncs"],
            "sync_sites": syncs["where"], **dynamo_delta(before), "kernels": take_kernels()}  # fmt: skip


def phase_p1(ph: Phase, device, quick: bool) -> None:
    import torch

    config = qwen2_config(device)
    rows, (L1, L2) = 2, ((256, 384) if device.type == "cuda" else (64, 96))
    stock = stock_model(config, device)
    batch = make_batch(config, device, rows, L1, pad=L1 // 8, seed=1)
    batch2 = make_batch(config, device, rows, L2, pad=L2 // 8, seed=2)
    want = "bfloat16"
    expected_kernel = "flex" if device.type == "cuda" else "sdpa"
    ph.data["setup"] = {
        "model": f"Qwen2 {config.num_hidden_layers} layers, hidden {config.hidden_size}, 14/2 heads of dim "
        f"{config.hidden_size // 14}, vocab {config.vocab_size}",
        "batch": f"{rows} x {L1} (then one step at {rows} x {L2}), last row right-padded by 1/8",
        "precision": "fp32 weights, bf16 autocast",
        "backend": "auto",
        "expected_kernel": expected_kernel,
    }
    # the stock model on the same batch: the reference for syncs per forward
    stock.train()
    for _ in range(2):
        with count_syncs(device) as syncs, autocast(device):
            stock_loss = stock(**{k: v for k, v in batch.items() if k != "semantic_ids"}).loss
        stock_loss.backward()
        stock.zero_grad(set_to_none=True)
    ph.data["stock_syncs_forward"] = syncs["syncs"]
    ph.data["stock_sync_sites"] = syncs["where"]
    take_kernels()
    modes = {
        "plain": (False, False),
        "checkpointing": (True, False),
        "learnable": (False, True),
        "learnable+checkpointing": (True, True),
    }
    ph.data["modes"] = {}
    plain = None
    for name, (ckpt, learnable) in modes.items():
        entry = ph.data["modes"][name] = {}
        try:
            model = hsa_model(stock, "auto", learnable=learnable)
            if ckpt:
                entry["checkpointing"] = enable_checkpointing(model)
            train_steps(ph, model, batch, device, 3, entry)
        except Exception as exc:  # one mode failing must not hide the others
            entry["error"] = tail(traceback.format_exc(), 2500)
            ph.check(f"{name}: trains", False, f"{type(exc).__name__}: {str(exc)[:500]}")
            continue
        finally:
            ph.save()
        kernels = [k for s in entry["steps"] for k in s["kernels"]]
        ph.check(f"{name}: losses finite", all(map(finite, entry["losses"])), entry["losses"])
        ph.check(f"{name}: q/k/v reach the kernel in {want}", kernel_dtypes_ok(kernels, want), describe(kernels))
        ran = sorted({k["kernel"] for k in kernels})
        entry["kernel_ran"] = ran
        ph.check(f"{name}: auto ran {expected_kernel}", ran == [expected_kernel], ran)
        if device.type == "cuda":
            eager = [k for k in kernels if k["kernel"] == "flex" and k["how"] != "compiled"]
            ph.check(f"{name}: flex compiled (never unfused)", not eager, describe(eager) or None)
            last = entry["steps"][-1]["syncs_forward"]
            ref = ph.data["stock_syncs_forward"]
            ph.check(f"{name}: syncs per forward <= stock model's", last is not None and last <= ref,
                     f"{last} (stock {ref}) at {entry['steps'][-1]['sync_sites']}")  # fmt: skip
        if learnable:
            grads = entry["lambda_grads"]
            ok = all(g is not None and all(map(finite, g)) and any(x != 0 for x in g) for g in grads)
            ph.check(f"{name}: λ gradients finite and non-zero", ok, grads)
        if name == "plain":
            plain = model
        else:
            del model
    grads = {n: ph.data["modes"].get(n, {}).get("lambda_grads") for n in ("learnable", "learnable+checkpointing")}
    if all(grads.values()):  # torch 2.13's unfused flex returns garbage λ gradients under checkpointing: not here
        a, b = (g[0] for g in grads.values())
        close = all(abs(x - y) <= 5e-2 * max(1e-3, abs(x)) for x, y in zip(a, b))
        ph.check("step-1 λ gradient the same with and without checkpointing", close, {"plain": a, "checkpointed": b})
    first = {n: m["losses"][0] for n, m in ph.data["modes"].items() if m.get("losses")}
    if len(first) > 1:
        spread = max(first.values()) - min(first.values())
        ph.check("step-1 loss equal across modes (same weights, same λ)", spread < 2e-2, first)
    if plain is not None:
        for key, fn in (
            ("eval", lambda: forward_only(plain, batch, device)),
            (f"train at {L2} tokens", lambda: train_steps(ph, plain, batch2, device, 1, {})),
        ):
            try:
                ph.data[key] = fn()
            except Exception as exc:
                ph.data[key] = {"error": tail(traceback.format_exc(), 2500)}
                ph.check(f"{key}: runs", False, f"{type(exc).__name__}: {str(exc)[:500]}")
                continue
            entry = ph.data[key]
            kernels = entry.get("kernels") or [k for s in entry.get("steps", []) for k in s["kernels"]]
            losses = [entry["loss"]] if "loss" in entry else entry["losses"]
            ph.check(f"{key}: loss finite", all(map(finite, losses)), losses)
            ph.check(f"{key}: q/k/v in {want}", kernel_dtypes_ok(kernels, want), describe(kernels))
    ph.data["recompile_limit"] = int(torch._dynamo.config.recompile_limit)
    ph.data["recompile_limit_hits"] = list(WATCH.hits)
    ph.data["graph_breaks"] = graph_break_reasons()
    ph.data["graphs_total"] = dynamo_state()["graphs"]
    ph.check("recompile limit never hit", not WATCH.hits, WATCH.hits or None)
    per_mode = {n: sum(s["graphs"] for s in m.get("steps", [])) for n, m in ph.data["modes"].items()}
    ph.data["graphs_per_mode"] = per_mode
    syncs = [m["steps"][-1]["syncs_forward"] for m in ph.data["modes"].values() if m.get("steps")]
    ran = sorted({k for m in ph.data["modes"].values() for k in m.get("kernel_ran", [])})
    ph.data["summary"] = (
        f"auto ran {'/'.join(ran) or '?'}; losses "
        + ", ".join(f"{n} {m['losses'][-1]:.3f}" for n, m in ph.data["modes"].items() if m.get("losses"))
        + f"; graphs {ph.data['graphs_total']} (per mode {list(per_mode.values())}), breaks "
        f"{sum(ph.data['graph_breaks'].values())}; syncs/forward {syncs if device.type == 'cuda' else 'n/a (cpu)'}"
    )


def phase_p2(ph: Phase, device, quick: bool) -> None:
    import torch
    import torch.nn.functional as F

    config = qwen2_config(device)
    L = 256 if device.type == "cuda" else 64
    stock = stock_model(config, device)
    batch = make_batch(config, device, 2, L, pad=L // 8, seed=3)
    real = batch["attention_mask"].bool()
    # fp32 leaves room for TF32 in a kernel; bf16 for its 8-bit mantissa (about 0.4% per rounding) over 2 layers
    tolerances = {"fp32": {"logits": 5e-3, "loss": 1e-3}, "bf16": {"logits": 0.05, "loss": 0.01}}
    ph.data["setup"] = {"batch": f"2 x {L}, last row right-padded by {L // 8}", "lambdas": LAMBDAS,
                        "tolerances": "max abs, the logits' scaled by max(1, max |reference logit|)",
                        "tolerance_values": tolerances, "compared": "logits of real tokens, loss"}  # fmt: skip

    def run(backend: str, precision: str):
        model = hsa_model(stock, backend).eval()
        take_kernels()
        with torch.no_grad(), autocast(device, enabled=precision == "bf16"):
            out = model(**batch)
        logits = out.logits.float()
        loss = float(F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100))
        return logits, loss, take_kernels()

    ref_logits, ref_loss, _ = run("eager", "fp32")
    scale = max(1.0, float(ref_logits[real].abs().max()))
    ph.data["reference"] = {"backend": "eager", "precision": "fp32", "loss": ref_loss, "logits_abs_max": scale}
    ph.data["rows"] = {}
    for backend in ("eager", "sdpa", "flex"):
        for precision in ("fp32", "bf16"):
            name = f"{backend} {precision}"
            if name == "eager fp32":
                continue
            try:
                logits, loss, kernels = run(backend, precision)
            except Exception as exc:
                ph.data["rows"][name] = {"error": tail(traceback.format_exc(), 2000)}
                ph.check(f"{name}: runs", False, f"{type(exc).__name__}: {str(exc)[:500]}")
                continue
            diff = float((logits[real] - ref_logits[real]).abs().max())
            dloss = abs(loss - ref_loss)
            tol = {"logits": tolerances[precision]["logits"] * scale, "loss": tolerances[precision]["loss"]}
            ok = diff <= tol["logits"] and dloss <= tol["loss"] and math.isfinite(diff)
            ph.data["rows"][name] = {"max_abs_logits": diff, "abs_loss": dloss, "loss": loss, "pass": ok,
                                     "kernels": kernels}  # fmt: skip
            ph.check(f"{name} vs eager fp32", ok, f"logits {diff:.3g} (tol {tol['logits']:.3g}), loss {dloss:.3g} "
                     f"(tol {tol['loss']}); {describe(kernels)}")  # fmt: skip
            ph.save()
    ph.data["summary"] = "max |Δlogits| / |Δloss|: " + ", ".join(
        f"{n} {r['max_abs_logits']:.2g}/{r['abs_loss']:.2g}" for n, r in ph.data["rows"].items() if "pass" in r
    )


P3_VARIANTS = ("sdpa causal", "flex causal", "HSA sdpa", "HSA flex", "HSA flex, learnable λ")


def p3_length(attention, L: int, device, dtype, shape: tuple[int, int, int], repeats: int, ph: Phase) -> dict:
    """One length of P3: every variant warmed up twice, then `repeats` interleaved timed calls."""
    import torch

    cuda = device.type == "cuda"
    heads, kv_heads, head_dim = shape
    torch.manual_seed(L)
    q0 = torch.randn(1, heads, L, head_dim, device=device, dtype=dtype)
    k0 = torch.randn(1, kv_heads, L, head_dim, device=device, dtype=dtype)
    v0 = torch.randn(1, kv_heads, L, head_dim, device=device, dtype=dtype)
    types = torch.randint(0, len(attention.LAMBDAS), (1, L), device=device)
    row: dict = {}
    calls = {}
    for variant in P3_VARIANTS:
        grad = cuda or "flex" not in variant
        if variant.endswith("learnable λ") and not cuda:
            row[variant] = {"skipped": "flex has no backward on CPU (learnable λ needs one)"}
            continue
        q, k, v = (t.detach().clone().requires_grad_(grad) for t in (q0, k0, v0))
        lam = None
        if variant.endswith("learnable λ"):
            lam = torch.tensor(attention.LAMBDAS, device=device, requires_grad=True)
        inputs = [t for t in (q, k, v, lam) if t is not None]
        row[variant] = {} if grad else {"note": "forward only: flex has no backward on CPU"}
        base = variant.removesuffix(", learnable λ")
        calls[variant] = (attention.make_call(base, q, k, v, types, lambdas=lam), inputs, grad)
    times = {v: {"forward": [], "backward": [], "total": []} for v in calls}
    peaks: dict[str, float] = {}

    def once(variant: str, timed: bool) -> None:
        call, inputs, grad = calls[variant]
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base_mem = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        with torch.set_grad_enabled(grad):
            out = call()
        sync(device)
        t1 = time.perf_counter()
        if grad:
            out.float().sum().backward()
            sync(device)
        t2 = time.perf_counter()
        del out
        for t in inputs:
            t.grad = None
        if cuda:
            peaks[variant] = max(peaks.get(variant, 0.0), (torch.cuda.max_memory_allocated() - base_mem) / 2**20)
        if timed:
            times[variant]["forward"].append(t1 - t0)
            times[variant]["backward"].append(t2 - t1 if grad else None)
            times[variant]["total"].append(t2 - t0)

    before = dynamo_state()
    dead: set[str] = set()
    for variant in calls:
        try:
            once(variant, False)
            once(variant, False)
        except Exception as exc:
            dead.add(variant)
            oom = isinstance(exc, torch.OutOfMemoryError)
            row[variant] = {"skipped": "out of memory" if oom else f"{type(exc).__name__}: {str(exc)[:300]}"}
            if not oom:
                row[variant]["error"] = tail(traceback.format_exc(), 2000)
                ph.check(f"{L} {variant}: runs", False, row[variant]["skipped"])
            if cuda:
                torch.cuda.empty_cache()
    live = [v for v in calls if v not in dead]
    for _ in range(repeats):
        for variant in live:
            once(variant, True)

    def ratio(variant: str, other: str, key: str) -> float | None:
        timed = key == "forward" or (calls[variant][2] and calls[other][2])  # totals only where both have backward
        if other not in live or not timed:
            return None
        return statistics.median(a / b for a, b in zip(times[variant][key], times[other][key]))

    for variant in live:
        entry, t, grad = row[variant], times[variant], calls[variant][2]
        entry["forward_ms_median"] = statistics.median(t["forward"]) * 1e3
        entry["forward_ms"] = [round(x * 1e3, 3) for x in t["forward"]]
        if grad:
            entry["backward_ms_median"] = statistics.median(t["backward"]) * 1e3
            entry["total_ms_median"] = statistics.median(t["total"]) * 1e3
            entry["total_ms"] = [round(x * 1e3, 3) for x in t["total"]]
        entry["peak_mib"] = peaks.get(variant)
        for key in ("forward", "total"):
            r = ratio(variant, "sdpa causal", key)
            if r is not None:
                entry[f"ratio_{key}_to_sdpa_causal"] = r
    if "HSA flex" in live:
        for key in ("forward", "total"):
            r = ratio("HSA flex", "flex causal", key)
            if r is not None:
                row["HSA flex"][f"ratio_{key}_to_flex_causal"] = r
    return {"variants": row, "kernels": take_kernels(), **dynamo_delta(before)}


def phase_p3(ph: Phase, device, quick: bool) -> None:
    import attention  # benchmarks/attention.py: make_call builds each variant's call as its own benchmark does
    import torch

    cuda = device.type == "cuda"
    if cuda:
        lengths, repeats = ([1024, 2048] if quick else [4096, 8192, 16384]), (3 if quick else 5)
    else:
        lengths, repeats = ([256, 512] if quick else [1024, 2048]), (2 if quick else 3)
    shape = (16, 4, 128)  # query heads, key-value heads, head dim
    dtype = torch.bfloat16 if cuda else torch.float32
    ph.data["setup"] = f"B=1, {shape[0]}/{shape[1]} heads, head dim {shape[2]}, {str(dtype).removeprefix('torch.')}"
    ph.data["repeats"] = repeats
    ph.data["lambdas"] = attention.LAMBDAS
    ph.data["timing"] = (
        "per repeat, variants interleaved: forward (inputs requiring grad where there is a backward) then backward, "
        "each synchronised; mask and bias built inside the forward; 2 warm-up calls each; peak memory above the "
        "inputs, forward and backward"
    )
    ph.data["lengths"] = {}
    ph.save()
    last = None
    for L in lengths:
        if last is not None and ph.left() < 2.5 * last:
            why = f"time budget: {ph.left():.0f} s left, the last length took {last:.0f}"
            ph.data["lengths"][str(L)] = {"skipped": why}
            ph.check(f"{L} tokens measured", None, f"not measured: {why}")
            continue
        t0 = time.perf_counter()
        ph.data["lengths"][str(L)] = p3_length(attention, L, device, dtype, shape, repeats, ph)
        last = time.perf_counter() - t0
        ph.data["lengths"][str(L)]["seconds"] = round(last, 1)
        if cuda:
            torch.cuda.empty_cache()
        ph.save()
    ph.data["recompile_limit_hits"] = list(WATCH.hits)
    ph.check("recompile limit never hit", not WATCH.hits, WATCH.hits or None)
    if cuda:
        unfused = [k for r in ph.data["lengths"].values() for k in r.get("kernels", [])
                   if k["kernel"] == "flex" and k["how"] != "compiled"]  # fmt: skip
        ph.check("flex compiled (never unfused)", not unfused, describe(unfused) or None)
    parts = []
    for L, r in ph.data["lengths"].items():
        hsa = (r.get("variants") or {}).get("HSA flex", {})
        what = "fwd+bwd" if "ratio_total_to_sdpa_causal" in hsa else "fwd"
        ratio = hsa.get("ratio_total_to_sdpa_causal") or hsa.get("ratio_forward_to_sdpa_causal")
        parts.append(f"{L}: HSA flex x{ratio:.2f} sdpa causal ({what})" if ratio else f"{L}: {r.get('skipped', '-')}")
    ph.data["summary"] = "; ".join(parts)


def phase_p4(ph: Phase, device, quick: bool) -> None:
    import torch

    from hsa_train.model import model_types
    from hsa_train.model.generation import generate_batch

    cuda = device.type == "cuda"
    config = qwen2_config(device, initializer_range=0.2)  # peaked logits: greedy choices far from ties
    stock = stock_model(config, device).eval()
    new_tokens = 10 if cuda else 8  # flex with a dynamic cache may compile a kernel per step: kept short
    lengths = (48, 40) if cuda else (24, 18)
    g = torch.Generator().manual_seed(5)
    prompts = []
    for n in lengths:
        ids = torch.randint(1, config.vocab_size, (n,), generator=g).tolist()
        prompts.append({"input_ids": ids, "semantic_ids": typed_spans(1, n, g)[0].tolist()})
    ph.data["setup"] = {"prompts": list(lengths), "left-padded": True, "new_tokens": new_tokens, "precision": "fp32",
                        "greedy": True, "reference": "sdpa, dynamic cache",
                        "ms_per_step": "a whole generate call (prefill included) / new tokens"}  # fmt: skip

    def generate(model, cache: str):
        pad_type = model_types(model).default_id
        options = {"max_new_tokens": new_tokens, "do_sample": False}
        if cache == "static":
            options["cache_implementation"] = "static"
        sync(device)
        t0 = time.perf_counter()
        out = generate_batch(model, prompts, config.pad_token_id, pad_type, **options)
        sync(device)
        return out, time.perf_counter() - t0

    # most telling first (a budget cut drops the last): on CUDA auto is flex, and a static cache makes transformers
    # compile the decoding step (CUDA graphs), sdpa's included
    if cuda:
        variants = [("sdpa", "dynamic"), ("auto", "dynamic"), ("auto", "static"), ("eager", "dynamic")]
        variants += [("sdpa", "static")]
    else:
        variants = [("sdpa", "dynamic"), ("sdpa", "static"), ("auto", "dynamic"), ("auto", "static")]
        variants += [("eager", "dynamic"), ("eager", "static")]
        ph.data["flex"] = "not run on CPU: auto is sdpa there (compiled CPU flex decoding is a reference path only)"
    ph.data["variants"] = {}
    reference = None
    for backend, cache in variants:
        name = f"{backend} {cache}"
        if ph.left() < 20:
            ph.data["variants"][name] = {"skipped": "time budget"}
            ph.check(f"{name}: ran", None, "not measured: time budget")
            continue
        entry = ph.data["variants"][name] = {}
        try:
            model = hsa_model(stock, backend).eval()
            take_kernels()
            before = dynamo_state()
            tokens, first = generate(model, cache)
            first_delta = dynamo_delta(before)
            before = dynamo_state()
            tokens2, second = generate(model, cache)
            second_delta = dynamo_delta(before)
        except Exception as exc:
            entry["error"] = tail(traceback.format_exc(), 2500)
            ph.check(f"{name}: generates", False, f"{type(exc).__name__}: {str(exc)[:500]}")
            continue
        finally:
            ph.save()
        kernels = take_kernels()
        entry.update({
            "tokens": tokens, "seconds_first": round(first, 3), "seconds_second": round(second, 3),
            "ms_per_step_first": round(first / new_tokens * 1e3, 2), "ms_per_step": round(second / new_tokens * 1e3, 2),
            "graphs_first_call": first_delta["graphs"], "graphs_second_call": second_delta["graphs"],
            "graph_breaks": first_delta["graph_breaks"] + second_delta["graph_breaks"], "kernels": kernels,
        })  # fmt: skip
        if name == "sdpa dynamic":
            reference = tokens
        ph.check(f"{name}: same tokens twice", tokens == tokens2, None if tokens == tokens2 else [tokens, tokens2])
        if reference is None:
            ph.check(f"{name}: tokens equal sdpa dynamic", None, "no reference: sdpa dynamic did not generate")
        else:
            ph.check(f"{name}: tokens equal sdpa dynamic", tokens == reference,
                     None if tokens == reference else {"got": tokens, "reference": reference})  # fmt: skip
        ph.check(f"{name}: no recompiles on a repeated call", second_delta["graphs"] == 0, second_delta)
        if cuda and backend in ("auto", "flex"):
            unfused = [k for k in kernels if k["kernel"] == "flex" and k["how"] != "compiled"]
            ph.check(f"{name}: flex compiled (never unfused)", not unfused, describe(unfused) or None)
        del model
    ph.data["recompile_limit_hits"] = list(WATCH.hits)
    ph.data["graph_breaks"] = graph_break_reasons()
    ph.check("recompile limit never hit", not WATCH.hits, WATCH.hits or None)
    ok = [n for n, v in ph.data["variants"].items() if "tokens" in v]
    ph.data["summary"] = "ms/token (graphs 1st call): " + ", ".join(
        f"{n} {ph.data['variants'][n]['ms_per_step']:.1f} ({ph.data['variants'][n]['graphs_first_call']})" for n in ok
    )
    skipped = [n for n, v in ph.data["variants"].items() if "skipped" in v]
    if skipped:
        ph.data["summary"] += f"; not measured (time budget): {', '.join(skipped)}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def phase_p5(ph: Phase, device, quick: bool) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    cuda = device.type == "cuda"
    backend = "nccl" if cuda else "gloo"
    init = {"backend": backend, "init_method": f"tcp://127.0.0.1:{free_port()}", "rank": 0, "world_size": 1}
    if cuda:
        torch.cuda.set_device(0)
        init["device_id"] = torch.device("cuda", 0)
    dist.init_process_group(**init)
    try:
        config = qwen2_config(device)
        L = 256 if cuda else 64
        model = hsa_model(stock_model(config, device), "auto", learnable=True)
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cuda else None
        kwargs = {"mp_policy": policy} if policy is not None else {}
        for layer in model.model.layers:
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)
        ph.data["setup"] = {"process_group": backend, "world_size": 1, "sharded": "each decoder layer, then the root",
                            "mixed_precision": "bf16 params, fp32 reduce" if cuda else "none (fp32)",
                            "batch": f"2 x {L}", "learnable": True}  # fmt: skip
        batch = make_batch(config, device, 2, L, pad=L // 8, seed=4)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model.train()
        steps = []
        for _ in range(2):
            take_kernels()
            before = dynamo_state()
            loss = model(**batch).loss
            loss.backward()
            grad = lambda_grad(model)
            opt.step()
            opt.zero_grad(set_to_none=True)
            steps.append({"loss": float(loss), "lambda_grad": grad, "kernels": take_kernels(), **dynamo_delta(before)})
            ph.data["steps"] = steps
            ph.save()
        ph.data["lambdas_after"] = lambda_values(model)
        losses = [s["loss"] for s in steps]
        grads = [s["lambda_grad"] for s in steps]
        kernels = [k for s in steps for k in s["kernels"]]
        ph.data["kernel_ran"] = sorted({k["kernel"] for k in kernels})
        ph.check("losses finite", all(map(finite, losses)), losses)
        ok = all(g is not None and all(map(finite, g)) and any(x != 0 for x in g) for g in grads)
        ph.check("λ gradients finite and non-zero", ok, grads)
        ph.check("λ moved", ph.data["lambdas_after"] != [LAMBDAS[t] for t in LAMBDAS], ph.data["lambdas_after"])
        want = "bfloat16" if cuda else "float32"
        ph.check(f"q/k/v reach the kernel in {want}", kernel_dtypes_ok(kernels, want), describe(kernels))
        ph.data["summary"] = (f"{backend}; losses {', '.join(f'{x:.3f}' for x in losses)}; λ grad "
                              f"{[round(x, 4) for x in grads[-1]] if grads[-1] else None}; "
                              f"{'/'.join(ph.data['kernel_ran'])}")  # fmt: skip
    finally:
        dist.destroy_process_group()


def phase_p6(ph: Phase, device, quick: bool) -> None:
    import tempfile
    from types import SimpleNamespace

    import bitsandbytes as bnb
    import torch

    from hsa_train.model import enable_hsa
    from hsa_train.model.loading import load_pretrained
    from hsa_train.model.lora import trainable_parts

    cuda = device.type == "cuda"
    config = qwen2_config(device)
    L = 256 if cuda else 64
    with tempfile.TemporaryDirectory() as folder:
        stock_model(config, torch.device("cpu")).save_pretrained(folder)
        model = load_pretrained(folder, torch.float32, quantization="4bit", device=device)
    enable_hsa(model, LAMBDAS, "auto", learnable=True)
    lora = SimpleNamespace(enabled=True, r=8, alpha=16, dropout=0.0, target_modules="all-linear")
    model, _ = trainable_parts(model, SimpleNamespace(quantization="4bit", freeze_vision=None, lora=lora), True)
    quantized = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    raw = next(p for n, p in model.named_parameters() if n.endswith("hsa.raw"))
    trained = [p for p in model.parameters() if p.requires_grad]
    ph.data["setup"] = {"bitsandbytes": bnb.__version__, "quantization": "nf4, double quant, bf16 compute",
                        "linear_4bit": quantized, "lambda_dtype": str(raw.dtype).replace("torch.", ""),
                        "trained_params": sum(p.numel() for p in trained), "batch": f"2 x {L}",
                        "autocast": "bf16" if cuda else "none (fp32)"}  # fmt: skip
    batch = make_batch(config, device, 2, L, pad=L // 8, seed=6)
    opt = torch.optim.AdamW(trained, lr=1e-3)
    ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    steps = []

    def train_step():
        model.train()
        take_kernels()
        with ctx():
            loss = model(**batch).loss
        loss.backward()
        grads = lambda_grad(model)
        adapter = [float(p.grad.norm()) if p.grad is not None else None for p in trained if p is not raw]
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps.append({"loss": float(loss), "lambda_grad": grads, "adapter_grad_norm_max": max(a or 0 for a in adapter),
                      "adapters_without_grad": sum(a is None for a in adapter), "kernels": take_kernels()})  # fmt: skip
        ph.data["steps"] = steps
        ph.save()

    for _ in range(3):
        train_step()
    model.eval()
    with torch.no_grad(), ctx():
        eval_loss = float(model(**batch).loss)
    ph.data["eval_loss"] = eval_loss
    train_step()  # training after an evaluation
    if cuda:
        ph.data["peak_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    losses = [s["loss"] for s in steps] + [eval_loss]
    grads = [s["lambda_grad"] for s in steps]
    kernels = [k for s in steps for k in s["kernels"]]
    ph.data["kernel_ran"] = sorted({k["kernel"] for k in kernels})
    ph.check("losses finite", all(map(finite, losses)), losses)
    ok = all(g is not None and all(map(finite, g)) and any(x != 0 for x in g) for g in grads)
    ph.check("λ gradients finite and non-zero", ok, grads)
    ph.check("every adapter has a gradient", all(s["adapters_without_grad"] == 0 for s in steps), steps[-1])
    ph.check("λ kept in fp32", raw.dtype == torch.float32, str(raw.dtype))
    ph.check("every decoder linear layer is 4-bit", quantized == 7 * config.num_hidden_layers, quantized)
    ph.data["summary"] = (f"{quantized} 4-bit layers; losses {', '.join(f'{x:.3f}' for x in losses[:-1])}; "
                          f"eval {eval_loss:.3f}; {'/'.join(ph.data['kernel_ran'])}"
                          + (f"; peak {ph.data['peak_memory_mib']} MiB" if cuda else ""))  # fmt: skip


PHASE_FUNCTIONS = {
    "P0": phase_p0, "P1": phase_p1, "P2": phase_p2, "P3": phase_p3, "P4": phase_p4, "P5": phase_p5, "P6": phase_p6,
}  # fmt: skip


def worker(args) -> int:
    import faulthandler

    ph = Phase(args.result_file, args.deadline)
    ph.save()
    if args.deadline:  # a hang prints every thread's stack into the log before the parent kills the worker
        faulthandler.dump_traceback_later(max(args.deadline - time.time(), 1), exit=False)
    install_spies()
    for name in ("torch._dynamo", "torch._dynamo.convert_frame"):
        logging.getLogger(name).addHandler(WATCH)
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available() and args.phase_worker != "P0":
        ph.status, ph.error = "failed", "--device cuda, but torch.cuda.is_available() is False"
        ph.save()
        return 1
    try:
        PHASE_FUNCTIONS[args.phase_worker](ph, device, args.quick)
        ph.status = "failed" if any(c["ok"] is False for c in ph.checks) else "ok"
        failed = [c for c in ph.checks if c["ok"] is False]
        if failed:
            ph.error = "; ".join(f"{c['name']}: {str(c['detail'])[:400]}" for c in failed)[:3000]
    except Exception:
        ph.status, ph.error = "failed", tail(traceback.format_exc(), 3000)
    ph.save()
    faulthandler.cancel_dump_traceback_later()
    return 0


if __name__ == "__main__":
    sys.exit(main())
