"""The data work as users meet it: LLaMA-Factory's demo datasets named through their dataset_info.json train with
`python -m hsa_train`, packed, and `python -m hsa_train.inspect` shows the same data."""

from __future__ import annotations

import json
import math
import re

from conftest import PEER_DATA, run_cli

from hsa_train.inspect import main as inspect_main

PEER = [
    f"data.dataset_info={PEER_DATA / 'dataset_info.json'}",
    "data.datasets=[identity,glaive_toolcall_en_demo,glaive_toolcall_zh_demo]",
    "data.train_files=[]",
    "data.on_error=skip",  # a few glaive records have a last turn longer than the cutoff: skipped and counted
]


def test_peer_datasets_train_packed_from_dataset_info(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(
        *PEER,
        "data.packing=true",
        "data.eval_ratio=0.02",
        "train.max_steps=2",
        "train.micro_batch_size=2",
        "train.eval_batch_size=8",
        "logging.progress=plain",
        "train.save_model=false",
        f"hydra.run.dir={run_dir}",
        f"data.cache_dir={tmp_path / 'cache'}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "tool calls are written as <tool_call> JSON" in out  # the shipped template has no tools: said once
    assert "packed rows" in out and "prepared" in out
    metrics = json.loads((run_dir / "metrics.json").read_text())
    data = metrics["data"]
    assert set(data["datasets"]) == {"identity", "glaive_toolcall_en_demo", "glaive_toolcall_zh_demo"}
    assert data["datasets"]["identity"]["records"] == 91
    assert 0.8 < data["packing_efficiency"] <= 1 and data["train_rows"] < metrics["samples_train"]
    assert metrics["skipped_records"] == sum(d["skipped"] for d in data["datasets"].values())
    assert all(math.isfinite(x) for x in metrics["train_losses"]) and math.isfinite(metrics["eval_loss"])


def test_inspect_shows_types_trained_tokens_and_figures(tmp_path, capsys):
    svg = tmp_path / "inspect.svg"
    code = inspect_main(
        [
            "--samples",
            "2",
            "--max-tokens",
            "20",
            "--svg",
            str(svg),
            *PEER,
            "data.packing=true",
            f"data.cache_dir={tmp_path / 'cache'}",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    for part in ("GLOBAL_CONDITION", "sample 0:", "sample 1:", "tokens per semantic type"):
        assert part in out, part
    assert re.search(r"\(\d+ more\s+tokens\)", out)  # --max-tokens cut the sample
    cells = re.sub(r"[│\s]+", " ", out)  # the table's wrapped cells, joined
    assert re.search(r": trained trained tokens per sample: mean \d+\.\d \(\d+-\d+\)", cells)
    for part in ("packing efficiency", "truncation", "where the types came from", "template", "default"):
        assert part in out, part
    assert svg.read_text().startswith("<svg")


def test_inspect_shows_preference_pairs_side_by_side(tmp_path, capsys):
    code = inspect_main(
        ["--samples", "2", "--max-tokens", "10", "stage=dpo", "data=dpo_demo", f"data.cache_dir={tmp_path / 'c'}"]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    first, second = out.split("sample 1 (rejected): ")
    assert "sample 0 (chosen): " in first and "preferences.jsonl:1," in second.splitlines()[0]  # pair 1's sides
    cells = re.sub(r"[│\s]+", " ", out)
    assert "pairs (train / eval) 540 / 60" in cells


def test_inspect_shows_a_labelled_sample_and_its_kl_sample(tmp_path, capsys):
    code = inspect_main(
        ["--samples", "2", "--max-tokens", "10", "stage=kto", "data=kto_demo", f"data.cache_dir={tmp_path / 'c'}"]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert re.search(r"sample 0 \((un)?desirable\): ", out)
    assert "sample 1 (its KL sample: the next record's completion): " in re.sub(r"\s*\n\s*", " ", out)
    cells = re.sub(r"[│\s]+", " ", out)
    assert "labelled samples (train / eval) 540 / 60" in cells


def test_inspect_reports_config_errors_in_one_line(capsys):
    assert inspect_main(["data.overlong=cut"]) == 2
    err = capsys.readouterr().err
    assert "data.overlong='cut' is not allowed" in err and err.count("\n") == 1
