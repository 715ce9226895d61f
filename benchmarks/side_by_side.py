"""Two versions of hsa_train measured side by side: this checkout and another commit's tree (a `git worktree`).

Each measure runs as a subprocess over each tree's package (the same benchmark scripts, this checkout's), the
trees alternating, `--repeats` times; the report gives each one's medians and the median of the per-repeat ratios
this / other (for seconds, below 1: this checkout is faster; for conversations/s, above 1).

- preprocess: `benchmarks/preprocess.py` (conversations/s of the full pipeline, building a cache entry, finding it);
- run data: `load_run_data` of a run over a generated trajectory file, cold (an empty cache) and warm (what a
  rerun, and each rank after rank 0, pays);
- step: `benchmarks/hsa_cost.py --lengths` (one training step of HSA sdpa, seconds and ratio to stock sdpa).

    git worktree add ../old-tree 8386135
    python benchmarks/side_by_side.py --other ../old-tree --out benchmarks/results/house_side_by_side.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent

# Times load_run_data twice in one process (cold cache, then warm); written for both the current API and 8386135's
# (the SemanticTokenizer builder moved from model/loading.py to data/vision.py).
RUN_DATA = textwrap.dedent(
    """
    import json, sys, tempfile, time
    from hydra import compose, initialize_config_module
    from hsa_train.config import validate
    from hsa_train.data.collator import SemanticCollator
    from hsa_train.data.pipeline import load_run_data
    from hsa_train.types import SemanticTypes
    data_file, cache_dir = sys.argv[1], sys.argv[2]
    with initialize_config_module(config_module="hsa_train.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"data.train_files=[{data_file}]", f"data.cache_dir={cache_dir}", "data.cutoff_len=4096",
        ])
    t0 = time.perf_counter()
    run = validate(cfg)
    types = SemanticTypes.from_names(run.hsa.types, run.hsa.default_type)
    try:
        from hsa_train.data.vision import semantic_tokenizer
        from hsa_train.model.loading import load_processing
        st = semantic_tokenizer(load_processing(run.model), types, run.data.train_on)
        kwargs = {"plan": run.dataset_plan}
    except ImportError:  # 8386135
        from hsa_train.model.loading import load_tokenizer, semantic_tokenizer
        m = run.model
        tok = load_tokenizer(m.tokenizer or m.name_or_path, m.trust_remote_code, m.chat_template)
        st = semantic_tokenizer(m, tok, run.hsa.types, run.hsa.default_type, run.data.train_on)
        kwargs = {}
    setup = time.perf_counter() - t0
    out = {"setup_s": setup}
    for name in ("cold_s", "warm_s"):
        t0 = time.perf_counter()
        data = load_run_data(run.data, st, SemanticCollator.from_tokenizer(st), run.seed, **kwargs)
        out[name] = time.perf_counter() - t0
    out["samples"] = len(data.train.ids) + len(data.eval)
    print(json.dumps(out))
    """
)


def staged(tree: Path, work: Path) -> Path:
    """A folder holding the tree's package laid out as it installs (conf/ as hsa_train.conf, data/ as
    hsa_train.bundled), to put first on PYTHONPATH: the editable install maps those names to this checkout."""
    root = work / f"pkg_{tree.name}"
    if not root.exists():
        shutil.copytree(tree / "hsa_train", root / "hsa_train", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(tree / "conf", root / "hsa_train" / "conf")
        shutil.copytree(tree / "data", root / "hsa_train" / "bundled")
    return root


def run_in(tree: Path, args: list[str], work: Path) -> str:
    path = staged(tree, work)
    env = {**os.environ, "PYTHONPATH": str(path), "HSA_TRAIN_CACHE": tempfile.mkdtemp(prefix="hsa_sbs_cache_")}
    done = subprocess.run([sys.executable, *args], cwd=HERE, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{tree}: {' '.join(args[:2])} failed:\n{done.stderr[-2000:]}")
    return done.stdout


def measures(tree: Path, work: Path, conversations: int, lengths: str, which: set[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    if "preprocess" in which:
        out |= preprocess_measures(tree, work, conversations)
    if "run_data" in which:
        out |= run_data_measures(tree, work)
    if "step" in which:
        out |= step_measures(tree, work, lengths)
    return out


def preprocess_measures(tree: Path, work: Path, conversations: int) -> dict[str, float]:
    out: dict[str, float] = {}
    pre = work / f"pre_{tree.name}.json"
    run_in(
        tree,
        ["benchmarks/preprocess.py", "--conversations", str(conversations), "--repeats", "1", "--out", str(pre)],
        work,
    )
    p = json.loads(pre.read_text())
    out["preprocess conversations/s"] = p["ways"]["full"]["conversations_per_s"]
    out["preprocess build s"] = p["prepare_build_s"]
    out["preprocess cached rerun s"] = p["prepare_cached_s"]
    return out


def run_data_measures(tree: Path, work: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    script = work / "run_data.py"
    script.write_text(RUN_DATA)
    cache = tempfile.mkdtemp(prefix=f"hsa_sbs_{tree.name}_")
    r = json.loads(run_in(tree, [str(script), str(work / "trajectories.jsonl"), cache], work).strip().splitlines()[-1])
    out["run data cold s"], out["run data warm s"] = r["cold_s"], r["warm_s"]
    return out


def step_measures(tree: Path, work: Path, lengths: str) -> dict[str, float]:
    out: dict[str, float] = {}
    step = work / f"step_{tree.name}.json"
    run_in(tree, ["benchmarks/hsa_cost.py", "--lengths", lengths, "--repeats", "3", "--out", str(step)], work)
    s = json.loads(step.read_text())
    for length, variants in s["lengths"].items():
        out[f"step L={length} HSA sdpa s"] = variants["HSA sdpa"]["seconds_median"]
        out[f"step L={length} HSA sdpa / stock"] = variants["HSA sdpa"]["ratio_to_stock_median"]
    return out


def trajectories(path: Path, n: int) -> None:
    sys.path.insert(0, str(HERE / "benchmarks"))
    import random

    from preprocess import trajectory

    rng = random.Random(1)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"messages": trajectory(rng)}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other", type=Path, required=True, help="the other tree (a git worktree of a commit)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--conversations", type=int, default=1500)
    parser.add_argument("--lengths", default="1024,2048")
    parser.add_argument("--measures", default="preprocess,run_data,step", help="which: preprocess, run_data, step")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    other = args.other.resolve()
    work = Path(tempfile.mkdtemp(prefix="hsa_sbs_"))
    trajectories(work / "trajectories.jsonl", args.conversations)
    trees = {"this": HERE, "other": other}
    got: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    for r in range(args.repeats):
        order = list(trees) if r % 2 == 0 else list(reversed(trees))
        for name in order:
            which = set(args.measures.split(","))
            got[name].append(measures(trees[name], work, args.conversations, args.lengths, which))
            print(f"repeat {r + 1} {name}: {json.dumps(got[name][-1])}", flush=True)
    report = {
        "this": str(HERE),
        "other": str(other),
        "repeats": args.repeats,
        "conversations": args.conversations,
        "command": " ".join(sys.argv),
        "measures": {},
    }
    for key in got["this"][0]:
        this = [m[key] for m in got["this"]]
        them = [m[key] for m in got["other"]]
        report["measures"][key] = {
            "this_median": statistics.median(this),
            "other_median": statistics.median(them),
            "ratio_this_over_other_median": statistics.median(a / b for a, b in zip(this, them)),
        }
        print(f"{key:>34}: this {statistics.median(this):10.4g}  other {statistics.median(them):10.4g}  "
              f"this/other {report['measures'][key]['ratio_this_over_other_median']:.3f}")  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
