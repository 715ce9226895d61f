"""Does the semantic bias help an agent, where, and against what (issue 21)? Every arm trained and measured the
same way on the same tasks, at the training length and at 2x and 4x, over seeds, with intervals.

    python benchmarks/evidence.py            # the full run: mqar and mqar_latest (about 75 minutes on 2 CPU cores)
    python benchmarks/evidence.py --tasks agent     # the closed-loop agent task (not in the default run; ~2.5 h)
    python benchmarks/evidence.py --quick    # every arm and task, a few steps and items (CI: it runs, it reports)
    python benchmarks/evidence.py --report   # the tables and figure again from the runs already recorded

Arms (conf/arm/*.yaml, each a config users run themselves: python -m hsa_train experiment=mqar arm=type_blind):
(a) plain attention, (b) HSA with the default λ, (c) HSA with λ learned per head, (d) a type-blind decay with
ALiBi's per-head slopes and one λ for every type, tuned on the training-length validation set over
TYPE_BLIND_GRID (the best of them on the first seed is then run on every seed), (e) observation masking (the
newest 4 noise turns stay, at training and at every turn of a rollout), (f) HSA with observation masking; and
(g), beyond the issue's list, HSA with the key events kept from fading (KEY_EVENT λ = 0, the noise at its default
0.1), to tell the type mechanism from the default key-event slope.

Tasks (TASKS):
- mqar: associative recall with distractors (data/generate_mqar.py): key events "Event: door red 7." among filler
  noise, questions at the end; accuracy of each answer's code, teacher-forced, by the set's length and by the gap
  in tokens between the event and the question.
- mqar_latest: the same with codes that change later; the answer is the latest code.
  Both fine-tune a base (benchmarks/induction_base.py, one per seed, built once into the work folder): a tiny model
  pre-trained only to copy repeats of random tokens, since a random initialisation never forms the induction
  circuit that recall needs in a CPU fine-tune (induction_base's docstring). The base's record is in each job's.
- agent: minigrid's Memory task as text (experiment=agent_demo): trained on expert episodes at size 9, rolled out
  closed-loop, greedy, at sizes 9, 15 and 27; success rate. At the CPU's budget (37 jobs, 2-6 minutes each): 2
  layers and 200 steps instead of agent_demo's 4 and 400. Both pick the object at chance (agent_demo: 56% success at
  size 9, README; 2 layers, 200 steps: 44% over 50 episodes), so the smaller run loses nothing the table could show;
  a random initialisation, since the induction base navigates worse (12% at size 27 after agent_demo's 400 steps).

Every job is a run of the CLI's config (composed in this process, as `python -m hsa_train <overrides>` would compose
it; the record keeps that command), then evaluated here through the library (load_trained, the agent runtime), and
recorded in results/evidence_runs/<task>/<arm>_s<seed>.json: per item correct or not, so that the statistics can
resample items. A recorded job is not run again (the full run resumes where it stopped). Statistics: the mean over
seeds and items with a 95% interval from a two-stage bootstrap (seeds, then items within each seed), and each arm
against (a) paired: the same seeds and the same items. A difference is called significant only when its interval
excludes zero. Beside the numbers: where each arm attends at the deciding step (diagnose's share of attention per
key type, the last answer's code or the last action, on the 4x set), the learned λ per type and head of (c), and
the training tokens/s per arm (ratios to (a), measured one after another on the same machine).
Writes results/evidence.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from induction_base import ARCH, build_base  # noqa: E402

ARMS = {
    "plain": "(a) plain attention",
    "hsa": "(b) HSA, default λ",
    "learnable": "(c) HSA, λ learned per head",
    "type_blind": "(d) type-blind decay (ALiBi slopes)",
    "obs_mask": "(e) observation masking",
    "hsa_obs_mask": "(f) HSA + observation masking",
    "hsa_noise": "(g) HSA, only noise decays (KEY_EVENT λ = 0)",
}
BASELINE = "plain"
TYPE_BLIND_GRID = (0.25, 1.0, 4.0)
LENGTHS = ("1x", "2x", "4x")
SEEDS = (1, 2, 3, 4, 5)
BOOTSTRAP = 2000
LEARNED = 0.9  # a seed "learned" the task when it scores this at the training length


@dataclass(frozen=True)
class Task:
    name: str
    experiment: str
    kind: str  # recall (teacher-forced codes) | rollout (closed-loop episodes)
    metric: str
    files: dict[str, str] = field(default_factory=dict)  # recall: length -> bundled eval file
    items: int = 100  # recall: records per length (4 or 3 questions each); rollout: episodes per length
    base: bool = False  # fine-tunes a base from benchmarks/induction_base.py (one per seed), not a random model
    overrides: tuple[str, ...] = ()  # the task's own settings, after its experiment's (the record keeps them)


TASKS = {
    "mqar": Task(
        "mqar", "mqar", "recall", "code accuracy",
        {n: f"mqar/eval_{n}.jsonl" for n in LENGTHS}, base=True,
    ),
    "mqar_latest": Task(
        "mqar_latest", "mqar_latest", "recall", "latest-code accuracy",
        {n: f"mqar/latest_eval_{n}.jsonl" for n in LENGTHS}, base=True,
    ),
    "agent": Task(
        "agent", "agent_demo", "rollout", "success rate", items=100,
        overrides=("model.arch.num_hidden_layers=2", "train.max_steps=200"),  # the CPU budget: see the docstring
    ),
}  # fmt: skip
FULL_TASKS = ("mqar", "mqar_latest")  # the agent task runs when named (--tasks agent): see the module's docstring
QUICK = (  # a few steps of a one-layer model: the whole pipeline, in CI's minutes
    "train.max_steps=4",
    "train.warmup_steps=1",
    "train.micro_batch_size=4",
    "model.arch.hidden_size=32",
    "model.arch.intermediate_size=64",
    "model.arch.num_hidden_layers=1",
)
QUICK_RECORDS = 48  # --quick trains and validates on the first records of each file
QUICK_EPISODE_STEPS = 4  # --quick rollouts stop after this many actions
QUICK_BASE = {"arch": {**ARCH, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}, "max_steps": 4}


# -- the bases ------------------------------------------------------------------------------------------------------
def ensure_base(seed: int, args) -> tuple[Path, dict]:
    """The seed's base (benchmarks/induction_base.py), built once and kept in the work folder: its path and record.
    Each seed has its own, so that the seeds' spread includes the base's."""
    folder = args.work / ("bases_quick" if args.quick else "bases") / f"s{seed}"
    record = folder / "base.json"
    if not record.is_file():
        print(f"[{time.strftime('%H:%M:%S')}] base for seed {seed}: training (induction_base.py)", flush=True)
        settings = dict(QUICK_BASE, target=0.0) if args.quick else {}
        built = build_base(folder, seed, **settings)
        if not args.quick and built["copy_accuracy"] < 0.9:
            raise SystemExit(
                f"evidence: the base for seed {seed} copies {built['copy_accuracy']:.2f} < 0.9 of its repeats after "
                f"{built['steps']} steps; delete {folder} and raise induction_base's max_steps"
            )
    return folder, json.loads(record.read_text())


# -- one job --------------------------------------------------------------------------------------------------------
def job_overrides(task: Task, arm: str, seed: int, extra: list[str], base: Path | None) -> list[str]:
    """The job's CLI overrides; the eval sets are measured here (per item), so the run skips its own pass."""
    out = [
        f"experiment={task.experiment}",
        f"arm={arm}",
        f"seed={seed}",
        "eval.rollout.episodes=0",
        "data.eval_sets={}",
        *task.overrides,
    ]
    if base is not None:
        out.append(f"model.name_or_path={base}")
    return [*out, *extra]


def train_job(overrides: list[str], run_dir: Path, subset: Path | None = None) -> dict:
    """The run `python -m hsa_train <overrides> hydra.run.dir=<run_dir>` makes, in this process; its metrics.
    `subset` (--quick): the data files are cut to their first QUICK_RECORDS records there first."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from hsa_train.config import validate
    from hsa_train.training.loop import train

    with initialize_config_module(config_module="hsa_train.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*overrides, "logging.progress=none", "train.save_model=true"])
    if subset is not None:
        data = cfg.data
        data.train_files = [cut(f, subset) for f in data.train_files]
        data.eval_files = [cut(f, subset) for f in data.eval_files]
        for source in data.datasets:
            source.path = cut(source.path, subset)
    run = validate(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a job cut off before it was recorded starts again
    run_dir.mkdir(parents=True)
    return train(run, resolved, run_dir), resolved


def cut(path: str, folder: Path) -> str:
    """The first QUICK_RECORDS lines of a JSON-lines file, written under `folder`; its path."""
    out = folder / Path(path).name
    if not out.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        with open(path, encoding="utf-8") as f:
            out.write_text("".join(line for _, line in zip(range(QUICK_RECORDS), f)), encoding="utf-8")
    return str(out)


# -- measuring a trained model ------------------------------------------------------------------------------------
CODE = re.compile(r"^Event: door (\w+) (\d)\.$")
ASKED = re.compile(r"^The door (\w+) (\d)\.$")


def windowed(trained, messages: list[dict]) -> list[dict]:
    """The messages the model sees: its training's observation window applied (none without one)."""
    from hsa_train.data.truncate import window_noise

    rules = trained.rules
    if rules.noise_window is None:
        return messages
    types = trained.st.types
    kept, _ = window_noise(messages, rules.noise_window, types.names, rules.keep_types, types.default)
    return [messages[i] for i in kept]


@torch.no_grad()
def recall_items(trained, path: Path, limit: int) -> dict[str, list]:
    """Each question's code, teacher-forced: {"correct": [0/1], "gap": [tokens from its event's code to the
    answer's], "kind": [ANSWER_KINDS, what the prediction was], "context": [tokens the model sees per record]}. The
    code is the answer's digit token; its prediction is the argmax at the token before it."""
    st, model = trained.st, trained.model
    out = {"correct": [], "gap": [], "kind": [], "context": []}
    for line in path.read_text().splitlines()[:limit]:
        messages = windowed(trained, json.loads(line)["messages"])
        enc = st.encode_detailed(messages)
        ids, sem = enc.features["input_ids"], enc.features["semantic_ids"]
        logits = model(input_ids=torch.tensor([ids]), semantic_ids=torch.tensor([sem])).logits[0]
        predicted = logits.argmax(-1).tolist()
        code_at, codes = {}, {}  # door -> the position of its latest code token so far; door -> its code tokens
        for pos, (token, where) in enumerate(zip(ids, enc.message_index)):
            if where < 0 or not st.tokenizer.decode([token]).strip().isdigit():
                continue
            message = messages[where]
            event, answer = CODE.match(message["content"]), ASKED.match(message["content"])
            if event and message["role"] == "user":
                code_at[event.group(1)] = pos
                codes.setdefault(event.group(1), []).append(token)
            elif answer and message["role"] == "assistant":
                out["correct"].append(int(predicted[pos - 1] == token))
                out["gap"].append(pos - code_at[answer.group(1)])
                out["kind"].append(answer_kind(predicted[pos - 1], token, answer.group(1), codes))
        out["context"].append(len(ids))
    return out


ANSWER_KINDS = ("right", "older code, same door", "another door's code", "no code of the trajectory")


def answer_kind(predicted: int, right: int, door: str, codes: dict[str, list[int]]) -> str:
    """What a predicted code was: right, a code the asked door had before (mqar_latest), a code of another door
    (the door's binding lost, the copying kept), or none of the trajectory's codes."""
    if predicted == right:
        return ANSWER_KINDS[0]
    if predicted in codes[door]:
        return ANSWER_KINDS[1]
    if any(predicted in tokens for other, tokens in codes.items() if other != door):
        return ANSWER_KINDS[2]
    return ANSWER_KINDS[3]


def rollout_items(trained, env_cfg: dict, episodes: int, seed: int, batch: int, max_new_tokens: int) -> dict:
    """Closed-loop greedy episodes: {"correct": [success 0/1], "outcome": ["right" | "wrong" object chosen, or
    "none": the step limit came first], "key_events": [KEY_EVENT messages the episode had], "context": [tokens at
    the last turn], "episodes"}. The outcome tells the memory (which object) from the route (whether it got
    there); the key events, whether there was anything to remember (the agent must look back to see one)."""
    from hsa_train.agent.decoding import DecodeOptions
    from hsa_train.agent.rollout import env_maker, run_episodes
    from hsa_train.agent.session import Agent

    agent = Agent(trained)
    done = run_episodes(
        env_maker(env_cfg),
        list(range(seed, seed + episodes)),
        agent,
        batch,
        DecodeOptions(max_new_tokens=max_new_tokens),
    )
    return {
        "correct": [int(e.success) for e in done],
        "outcome": ["none" if e.truncated else "right" if e.success else "wrong" for e in done],
        "key_events": [sum(m.get("semantic_type") == "KEY_EVENT" for m in e.messages) for e in done],
        "context": [e.tokens for e in done],
        "episodes": done,
    }


def attention_shares(trained_dir: Path, samples: list, n_types: int) -> dict[str, list[float]]:
    """diagnose's share of attention per key type at the deciding positions, with the model's own bias, averaged
    over layers; and each type's share of the context (uniform attention)."""
    from hsa_train.agent.folder import load_trained
    from hsa_train.diagnose import attention_by_type

    eager = load_trained(trained_dir, backend="eager")
    result = attention_by_type(eager.model, samples, n_types)
    return {"attended": result["with_bias"].mean(0).tolist(), "context": result["keys"].tolist()}


def recall_decisions(trained, path: Path, limit: int) -> list:
    """diagnose's samples (hsa_train's Sample: features and the deciding token's span) at the last question's code
    of the first `limit` records: the token the answer turns on."""
    from hsa_train.data.store import Sample

    st, decisions = trained.st, []
    for line in path.read_text().splitlines()[:limit]:
        messages = windowed(trained, json.loads(line)["messages"])
        enc = st.encode_detailed(messages)
        last = len(messages) - 1
        digits = [
            p for p, (t, w) in enumerate(zip(enc.features["input_ids"], enc.message_index))
            if w == last and st.tokenizer.decode([t]).strip().isdigit()
        ]  # fmt: skip
        decisions.append(Sample(enc.features, (digits[0], digits[0] + 1), f"{path.name}, record {len(decisions) + 1}"))
    return decisions


def episode_decisions(trained, episodes: list, limit: int) -> list:
    """The last action of the first `limit` episodes, in the context the model acted in (the window applied), as
    diagnose's samples."""
    from hsa_train.data.store import Sample

    decisions = []
    for episode in episodes[:limit]:
        messages = list(episode.messages)
        while messages and messages[-1]["role"] != "assistant":
            messages.pop()  # the environment's last word comes after the deciding action
        enc = trained.st.encode_detailed(windowed(trained, messages))
        if enc.answer is not None:
            decisions.append(Sample(enc.features, enc.answer, f"episode seed {episode.seed}"))
    return decisions


def measure(task: Task, run_dir: Path, resolved: dict, quick: bool) -> dict[str, Any]:
    """Items per length, attention shares at the 4x deciding step, and the learned λ of the run's model."""
    from hsa_train.agent.folder import load_trained
    from hsa_train.config import bundled_path

    trained = load_trained(run_dir / "model")
    limit = 8 if quick else task.items
    lengths, decisions = {}, []
    if task.kind == "recall":
        for name, file in task.files.items():
            lengths[name] = recall_items(trained, Path(bundled_path(file)), limit)
        decisions = recall_decisions(trained, Path(bundled_path(task.files["4x"])), 4 if quick else 32)
    else:
        rollout = resolved["eval"]["rollout"]
        variants = dict(rollout["variants"])
        for name, variant in zip(LENGTHS, variants):
            env = {**rollout["env"], **variants[variant]}
            if quick:
                env["max_steps"] = QUICK_EPISODE_STEPS
            got = rollout_items(trained, env, 2 if quick else task.items, rollout["seed"], 8, rollout["max_new_tokens"])
            episodes = got.pop("episodes")
            lengths[name] = got
        decisions = episode_decisions(trained, episodes, 4 if quick else 32)
    settings = trained.settings
    types = list(trained.st.types.names)
    return {
        "lengths": lengths,
        "attention_4x": attention_shares(run_dir / "model", decisions, len(types)) if decisions else None,
        "types": types,
        "lambdas": settings.lambdas,
        "lambdas_per_head": settings.lambdas_per_head,
    }


# -- the jobs of a run ---------------------------------------------------------------------------------------------
def runs_dir(args) -> Path:
    """Where the jobs' records go: --quick's apart, so that a full run never takes a quick job's record for its own."""
    return args.out / ("evidence_runs_quick" if args.quick else "evidence_runs")


def record_path(args, task: str, arm: str, seed: int, tag: str = "") -> Path:
    return runs_dir(args) / task / f"{arm}{tag}_s{seed}.json"


def run_recorded(task: Task, arm: str, seed: int, extra: list[str], args, tag: str = "") -> dict:
    """The job's record: read when recorded before, else trained, measured and recorded now."""
    path = record_path(args, task.name, arm, seed, tag)
    if path.is_file():
        return json.loads(path.read_text())
    base, base_record = ensure_base(seed, args) if task.base else (None, None)
    overrides = job_overrides(task, arm, seed, extra, base)
    run_dir = args.work / task.name / f"{arm}{tag}_s{seed}"
    started = time.time()
    print(f"[{time.strftime('%H:%M:%S')}] {task.name} {arm}{tag} seed {seed}: training", flush=True)
    metrics, resolved = train_job(overrides, run_dir, args.work / "quick_data" if args.quick else None)
    measured = measure(task, run_dir, resolved, args.quick)
    record = {
        "task": task.name,
        "arm": arm,
        "seed": seed,
        "command": "python -m hsa_train " + " ".join(overrides),
        "base": base_record,
        "base_command": f"python benchmarks/induction_base.py --out {base} --seed {seed}" if base else None,
        "tokens_per_s": metrics["tokens_per_s"],
        "train_time_s": metrics["train_time_s"],
        "eval_loss": metrics["eval_loss"],
        "eval_answer_token_accuracy": metrics["eval_answer_token_accuracy"],
        "wall_s": time.time() - started,
        **measured,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record) + "\n")
    shutil.rmtree(run_dir, ignore_errors=True)  # the record holds what the tables need; models are rebuilt by seed
    means = {n: f"{np.mean(v['correct']):.2f}" for n, v in measured["lengths"].items()}
    print(f"    {task.name} {arm}{tag} seed {seed}: {means} ({record['wall_s']:.0f} s)", flush=True)
    return record


def tuned_type_blind(task: Task, args, extra: list[str]) -> tuple[float, dict[str, float]]:
    """(the best λ of TYPE_BLIND_GRID, all scores): scored on the first seed's validation set at the training
    length, the run's own held-out split (its answers' token accuracy), never on the sets the tables report."""
    scores = {}
    grid = TYPE_BLIND_GRID[:2] if args.quick else TYPE_BLIND_GRID
    for value in grid:
        record = run_recorded(
            task, "type_blind", args.seeds[0], [*extra, f"hsa.lambdas.PROCESS_NOISE={value}"], args, f"@{value}"
        )
        scores[str(value)] = _tuning_score(record)
    best = chosen_lambda({v: scores[str(v)] for v in grid})
    return best, scores


def run_task(task: Task, args) -> dict[str, list[dict]]:
    """{arm: [record per seed]}; type_blind's λ tuned first (its best tuning job doubles as its first seed)."""
    extra = list(QUICK) if args.quick else []
    records: dict[str, list[dict]] = {}
    tuning = None
    for arm in args.arms:
        arm_extra = list(extra)
        if arm == "type_blind":
            best, scores = tuned_type_blind(task, args, extra)
            tuning = {"grid": scores, "chosen": best}
            arm_extra.append(f"hsa.lambdas.PROCESS_NOISE={best}")
        records[arm] = []
        for seed in args.seeds:
            if arm == "type_blind" and seed == args.seeds[0]:
                record = json.loads(record_path(args, task.name, arm, seed, f"@{tuning['chosen']}").read_text())
            else:
                record = run_recorded(task, arm, seed, arm_extra, args)
            records[arm].append(record)
    return {"records": records, "type_blind_tuning": tuning}


# -- statistics -----------------------------------------------------------------------------------------------------
def bootstrap(per_seed: list[np.ndarray], reps: int, rng: np.random.Generator, paired: list[np.ndarray] | None = None):
    """(mean, low, high): the mean over seeds of each seed's mean over items, with a 95% percentile interval from
    a two-stage bootstrap (seeds with replacement, then items within each chosen seed). With `paired` (the same
    items of another arm, seed by seed), the same of the differences per item: a paired comparison."""
    values = [np.asarray(v, dtype=float) for v in per_seed]
    if paired is not None:
        values = [v - np.asarray(p, dtype=float) for v, p in zip(values, paired)]
    point = float(np.mean([v.mean() for v in values]))
    draws = np.empty(reps)
    n = len(values)
    for r in range(reps):
        seeds = rng.integers(0, n, n)
        draws[r] = np.mean([values[s][rng.integers(0, len(values[s]), len(values[s]))].mean() for s in seeds])
    low, high = np.percentile(draws, [2.5, 97.5])
    return point, float(low), float(high)


def summarize(tasks: dict[str, dict], reps: int = BOOTSTRAP, seed: int = 0) -> dict[str, Any]:
    """Per task, arm and length: mean and interval; against the baseline: the paired difference, its interval,
    and whether the interval excludes zero. Plus cost (tokens/s, context tokens) and diagnostics per arm."""
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {}
    for name, result in tasks.items():
        records = result["records"]
        base = records.get(BASELINE)
        table: dict[str, Any] = {}
        for arm, runs in records.items():
            row: dict[str, Any] = {"seeds": [r["seed"] for r in runs], "lengths": {}}
            for length in LENGTHS:
                per_seed = [np.asarray(r["lengths"][length]["correct"]) for r in runs]
                mean, low, high = bootstrap(per_seed, reps, rng)
                cell = {"mean": mean, "ci95": [low, high], "items": int(sum(len(v) for v in per_seed))}
                if base is not None and arm != BASELINE:
                    by_seed = {r["seed"]: r for r in base}
                    pairs = [(r, by_seed[r["seed"]]) for r in runs if r["seed"] in by_seed]
                    diff, dlow, dhigh = bootstrap(
                        [np.asarray(a["lengths"][length]["correct"]) for a, _ in pairs],
                        reps,
                        rng,
                        paired=[np.asarray(b["lengths"][length]["correct"]) for _, b in pairs],
                    )
                    cell["vs_plain"] = {"diff": diff, "ci95": [dlow, dhigh], "significant": dlow > 0 or dhigh < 0}
                row["lengths"][length] = cell
            row["learned"] = sum(float(np.mean(r["lengths"][LENGTHS[0]]["correct"])) >= LEARNED for r in runs)
            row["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in runs)
            row["context_tokens_4x"] = float(np.mean([np.mean(r["lengths"]["4x"]["context"]) for r in runs]))
            shares = [r["attention_4x"] for r in runs if r.get("attention_4x")]
            if shares:
                row["attention_4x"] = {
                    "attended": np.mean([s["attended"] for s in shares], axis=0).tolist(),
                    "context": np.mean([s["context"] for s in shares], axis=0).tolist(),
                }
            if arm == "learnable":
                row["lambdas_per_head"] = [r["lambdas_per_head"] for r in runs]
            if "gap" in runs[0]["lengths"]["1x"]:
                row["by_gap"] = by_gap(runs)
            if all("outcome" in r["lengths"]["1x"] for r in runs):
                row["choice"] = {n: choice_accuracy(runs, n, reps, rng) for n in LENGTHS}
                row["choice_after_event"] = {n: choice_accuracy(runs, n, reps, rng, after_event=True) for n in LENGTHS}
            if all("kind" in r["lengths"]["1x"] for r in runs):  # recorded since the error kinds were added
                kinds = [k for r in runs for k in r["lengths"]["1x"]["kind"]]
                row["answers_1x"] = {k: kinds.count(k) for k in ANSWER_KINDS}
            table[arm] = row
        if base is not None:
            plain_speed = table[BASELINE]["tokens_per_s"]
            for row in table.values():
                row["speed_vs_plain"] = row["tokens_per_s"] / plain_speed
        out[name] = {"arms": table, "type_blind_tuning": result.get("type_blind_tuning"), "types": _types(records)}
    return out


GAP_BINS = (0, 100, 200, 400, 800, 1600, 10**9)


def choice_accuracy(
    runs: list[dict], length: str, reps: int, rng: np.random.Generator, after_event: bool = False
) -> dict[str, Any]:
    """The right object among the episodes that chose one (chance: 1/2), with the same two-stage bootstrap over
    the seeds that chose at all; and how many episodes chose. `after_event`: only those that had seen the key
    event before they chose, the ones with something to remember."""
    chosen = []
    for r in runs:
        outcome = np.asarray(r["lengths"][length]["outcome"])
        picked = outcome != "none"
        if after_event:
            picked &= np.asarray(r["lengths"][length]["key_events"]) > 0
        if picked.any():
            chosen.append((outcome[picked] == "right").astype(float))
    episodes = sum(len(r["lengths"][length]["outcome"]) for r in runs)
    cell = {"chose": int(sum(len(c) for c in chosen)), "episodes": episodes}
    if chosen:
        mean, low, high = bootstrap(chosen, reps, rng)
        cell.update(mean=mean, ci95=[low, high])
    return cell


def by_gap(runs: list[dict]) -> list[dict[str, Any]]:
    """Accuracy by the gap between a code's event and its question, pooled over lengths and seeds."""
    correct = np.concatenate([np.asarray(r["lengths"][n]["correct"]) for r in runs for n in LENGTHS])
    gaps = np.concatenate([np.asarray(r["lengths"][n]["gap"]) for r in runs for n in LENGTHS])
    rows = []
    for low, high in zip(GAP_BINS, GAP_BINS[1:]):
        inside = (gaps >= low) & (gaps < high)
        if inside.any():
            rows.append({"gap": [low, high], "items": int(inside.sum()), "accuracy": float(correct[inside].mean())})
    return rows


def _types(records: dict[str, list[dict]]) -> list[str]:
    return next(r["types"] for runs in records.values() for r in runs)


# -- the report -------------------------------------------------------------------------------------------------------
def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def with_interval(cell: dict) -> str:
    """A cell's mean and 95% interval in %: "52.2 [47.4, 57.2]"."""
    return f"{pct(cell['mean'])} [{pct(cell['ci95'][0])}, {pct(cell['ci95'][1])}]"


def markdown(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [
        "# Evidence: HSA against plain attention, a type-blind decay and observation masking",
        "",
        f"{meta['seeds']} seeds per arm and task; mean with its 95% interval (two-stage bootstrap over seeds and "
        "items, in %); Δ: paired difference against (a), **bold** where its interval excludes zero. "
        f"Commit {meta['commit']}, {meta['when']}, {meta['device']}.",
    ]
    for task, result in summary.items():
        arms = result["arms"]
        header = f"| arm | {' | '.join(LENGTHS)} | seeds at ≥ {pct(LEARNED)}% (1x) | tokens/s vs (a) |"
        lines += ["", f"## {task}: {TASKS[task].metric}", "", header, "|---" * (len(LENGTHS) + 3) + "|"]
        for arm, row in arms.items():
            cells = []
            for length in LENGTHS:
                c = row["lengths"][length]
                text = with_interval(c)
                vs = c.get("vs_plain")
                if vs:
                    delta = f"Δ {vs['diff'] * 100:+.1f} [{vs['ci95'][0] * 100:+.1f}, {vs['ci95'][1] * 100:+.1f}]"
                    text += "<br>" + (f"**{delta}**" if vs["significant"] else delta)
                cells.append(text)
            speed = f"{row.get('speed_vs_plain', 1.0):.2f}x"
            learned = f"{row['learned']} of {len(row['seeds'])}"
            lines.append(f"| {ARMS[arm]} | " + " | ".join(cells) + f" | {learned} | {speed} |")
        tuning = result.get("type_blind_tuning")
        if tuning:
            grid = ", ".join(f"λ={k}: {pct(v)}" for k, v in tuning["grid"].items())
            lines += ["", f"(d)'s λ, tuned on seed {meta['seed_list'][0]}'s validation at 1x: {grid}; chosen "
                      f"{tuning['chosen']}."]  # fmt: skip
        types = result["types"]
        lines += ["", "Share of attention at the deciding step (4x, mean over layers and seeds): "
                  + ", ".join(types) + "; the last row is each type's share of the context.", ""]  # fmt: skip
        lines += ["| arm | " + " | ".join(types) + " |", "|---" * (len(types) + 1) + "|"]
        for arm, row in arms.items():
            if "attention_4x" in row:
                lines.append(
                    f"| {ARMS[arm]} | " + " | ".join(f"{x:.3f}" for x in row["attention_4x"]["attended"]) + " |"
                )
        if "attention_4x" in arms.get(BASELINE, {}):
            context = arms[BASELINE]["attention_4x"]["context"]
            lines.append("| context share (plain) | " + " | ".join(f"{x:.3f}" for x in context) + " |")
        learned = arms.get("learnable", {}).get("lambdas_per_head")
        if learned and learned[0]:
            lines += ["", "(c)'s learned λ per head (seed by seed, heads in order):", ""]
            for seed, table in zip(arms["learnable"]["seeds"], learned):
                lines.append(
                    f"- seed {seed}: " + "; ".join(f"{t} " + ", ".join(f"{x:.3f}" for x in v) for t, v in table.items())
                )
        gap_rows = {arm: row["by_gap"] for arm, row in arms.items() if "by_gap" in row}
        if gap_rows:
            bins = [tuple(r["gap"]) for r in next(iter(gap_rows.values()))]
            header = [f"{lo}-{hi if hi < 10**9 else '...'}" for lo, hi in bins]
            lines += ["", "Accuracy by the gap between the event and its question (tokens; all lengths and seeds):", ""]
            lines += ["| arm | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
            for arm, rows in gap_rows.items():
                by = {tuple(r["gap"]): r["accuracy"] for r in rows}
                lines.append(f"| {ARMS[arm]} | " + " | ".join(pct(by[b]) if b in by else "-" for b in bins) + " |")
        for key, what in (("choice", "that chose one"), ("choice_after_event", "that saw the key event, then chose")):
            choice_rows = {arm: row[key] for arm, row in arms.items() if key in row}
            if not choice_rows:
                continue
            lines += ["", f"The right object among the episodes {what} (%, 95% interval; chance 50%); how many "
                      "of all:", ""]  # fmt: skip
            lines += [f"| arm | {' | '.join(LENGTHS)} |", "|---" * (len(LENGTHS) + 1) + "|"]
            for arm, cells in choice_rows.items():
                text = [
                    (with_interval(c) if "mean" in c else "-") + f"; {c['chose']} of {c['episodes']}"
                    for c in (cells[n] for n in LENGTHS)
                ]
                lines.append(f"| {ARMS[arm]} | " + " | ".join(text) + " |")
        kind_rows = {arm: row["answers_1x"] for arm, row in arms.items() if "answers_1x" in row}
        if kind_rows:
            lines += ["", "What the predicted code was at 1x (questions, all seeds):", ""]
            lines += ["| arm | " + " | ".join(ANSWER_KINDS) + " |", "|---" * (len(ANSWER_KINDS) + 1) + "|"]
            for arm, counts in kind_rows.items():
                lines.append(f"| {ARMS[arm]} | " + " | ".join(str(counts[k]) for k in ANSWER_KINDS) + " |")
        lines += ["", "Context the model sees at 4x (tokens, mean): "
                  + ", ".join(f"{ARMS[a][:3]} {row['context_tokens_4x']:.0f}" for a, row in arms.items())]  # fmt: skip
    lines += ["", "Reproduce: " + meta["reproduce"], ""]
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (pip install 'hsa_train[plot]'): no figure")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summary), figsize=(max(4.2 * len(summary), 7.0), 4.2), squeeze=False)
    x = np.arange(len(LENGTHS))
    for ax, (task, result) in zip(axes[0], summary.items()):
        arms = result["arms"]
        for k, (arm, row) in enumerate(arms.items()):
            means = np.array([row["lengths"][n]["mean"] for n in LENGTHS])
            low = np.array([row["lengths"][n]["ci95"][0] for n in LENGTHS])
            high = np.array([row["lengths"][n]["ci95"][1] for n in LENGTHS])
            offset = (k - (len(arms) - 1) / 2) * 0.05
            ax.errorbar(x + offset, means, yerr=[means - low, high - means], marker="o", capsize=3, label=ARMS[arm])
        ax.set_xticks(x, [f"{n} length" for n in LENGTHS])
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{task}: {TASKS[task].metric}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean over seeds, 95% interval")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.055 * math.ceil(len(labels) / 3), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _commit() -> str:
    import subprocess

    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps and items per job (CI)")
    parser.add_argument("--report", action="store_true", help="tables and figure from the recorded runs only")
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=None,
                        help=f"tasks (default {' '.join(FULL_TASKS)}; --quick: all)")  # fmt: skip
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help=f"seeds (default {SEEDS}; --quick: 2)")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="where evidence.* and the runs go")
    parser.add_argument("--work", type=Path, default=None, help="run folders while a job runs (default: <out>/.work)")
    args = parser.parse_args(argv)
    args.seeds = args.seeds or (list(SEEDS[:2]) if args.quick else list(SEEDS))
    args.tasks = args.tasks or (list(TASKS) if args.quick else list(FULL_TASKS))
    if BASELINE not in args.arms:
        parser.error(f"--arms must include {BASELINE}: every arm is compared with it")
    if len(args.seeds) < 2:
        parser.error("--seeds: give two or more (the intervals resample seeds)")
    args.work = args.work or args.out / ".work"
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    results = {}
    for name in args.tasks:
        task = TASKS[name]
        if args.report:
            results[name] = recorded(task, args)
        else:
            results[name] = run_task(task, args)
    summary = summarize(results)
    stem = "evidence_quick" if args.quick else "evidence"
    meta = {
        "commit": _commit(),
        "when": time.strftime("%Y-%m-%d"),
        "device": f"{torch.get_num_threads()} CPU threads",
        "seeds": len(args.seeds),
        "seed_list": args.seeds,
        "quick": args.quick,
        "reproduce": "python benchmarks/evidence.py"
        + (" --quick" if args.quick else "")
        + f" --tasks {' '.join(args.tasks)} --arms {' '.join(args.arms)} --seeds {' '.join(map(str, args.seeds))}",
        "bootstrap": BOOTSTRAP,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "tasks": summary}, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(summary, meta))
    plot(summary, args.out / f"{stem}.png")
    print((args.out / f"{stem}.md").read_text())
    return 0


def recorded(task: Task, args) -> dict:
    """The records of a finished run, as run_task returns them."""
    records, tuning = {}, None
    for arm in args.arms:
        runs = [record_path(args, task.name, arm, s) for s in args.seeds]
        if arm == "type_blind":
            tuned = sorted((runs_dir(args) / task.name).glob(f"type_blind@*_s{args.seeds[0]}.json"))
            scores = {float(p.name.split("@")[1].rsplit("_s", 1)[0]): json.loads(p.read_text()) for p in tuned}
            if not scores:
                raise SystemExit(
                    f"evidence: {task.name}'s type_blind tuning is not recorded yet (run without --report)"
                )
            chosen = chosen_lambda({v: _tuning_score(r) for v, r in scores.items()})
            tuning = {"grid": {str(v): _tuning_score(r) for v, r in sorted(scores.items())}, "chosen": chosen}
            runs[0] = record_path(args, task.name, arm, args.seeds[0], f"@{chosen}")
        missing = [str(p) for p in runs if not p.is_file()]
        if missing:
            raise SystemExit(f"evidence: not recorded yet: {missing[0]} (run without --report first)")
        records[arm] = [json.loads(p.read_text()) for p in runs]
    return {"records": records, "type_blind_tuning": tuning}


def chosen_lambda(scores: dict[float, float]) -> float:
    """The best-scoring λ of the tuning; a tie goes to the smaller λ."""
    return max(scores, key=lambda v: (scores[v], -v))


def _tuning_score(record: dict) -> float:
    return record["eval_answer_token_accuracy"]


if __name__ == "__main__":
    sys.exit(main())
