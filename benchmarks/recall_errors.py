"""What a trained recall model answers when it is wrong: an older code of the asked door (it missed the latest), a
code of another door (it copies, but lost which door was asked), or none of the trajectory's codes. This is how
the mqar_latest failure of the HSA arms was read (README, "Evidence"); evidence.py records the same per question.

    python -m hsa_train experiment=mqar_latest arm=hsa seed=2 model.name_or_path=<base> hydra.run.dir=runs/hsa_s2
    python benchmarks/recall_errors.py runs/hsa_s2/model --task mqar_latest --lengths 1x 4x
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from evidence import ANSWER_KINDS, LENGTHS, TASKS, recall_items  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    recall = [name for name, task in TASKS.items() if task.kind == "recall"]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="a trained model folder (a run's model/)")
    parser.add_argument("--task", choices=recall, default="mqar_latest")
    parser.add_argument("--lengths", nargs="+", choices=LENGTHS, default=list(LENGTHS))
    parser.add_argument("--items", type=int, default=100, help="trajectories per length (from the start of its file)")
    args = parser.parse_args(argv)
    if not (args.model / "config.json").is_file():
        parser.error(f"{args.model}: no config.json there; give a trained model folder (a run's model/)")

    from hsa_train.agent.folder import load_trained
    from hsa_train.config import bundled_path

    trained = load_trained(args.model)
    counts = {}
    for length in args.lengths:
        items = recall_items(trained, Path(bundled_path(TASKS[args.task].files[length])), args.items)
        counts[length] = {kind: items["kind"].count(kind) for kind in ANSWER_KINDS}
        print(f"{length}: " + ", ".join(f"{kind} {n}" for kind, n in counts[length].items()), flush=True)
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
