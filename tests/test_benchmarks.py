"""The benchmark scripts run against the current library (they import its pieces, so a refactor can break them
without any other test noticing). Tiny settings: this checks that they run and report, not the numbers."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT, cli_env


def run_script(name: str, *args: str, tmp_path) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), *args],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_loop_against_trainer_benchmark_runs(tmp_path):
    out = tmp_path / "train.json"
    run_script("train.py", "--steps", "2", "--repeats", "1", "--records", "16", "--out", str(out), tmp_path=tmp_path)
    result = json.loads(out.read_text())
    assert result["ratio_median"] > 0 and len(result["ours_tokens_per_s"]) == len(result["trainer_tokens_per_s"]) == 1


def test_hsa_cost_benchmark_runs_every_variant(tmp_path):
    out = tmp_path / "cost.json"
    run_script("hsa_cost.py", "--steps", "1", "--repeats", "1", "--out", str(out), tmp_path=tmp_path)
    variants = json.loads(out.read_text())["variants"]
    assert len(variants) == 5 and all(v["tokens_per_s_median"] > 0 for v in variants.values())


def test_preprocess_benchmark_runs(tmp_path):
    out = tmp_path / "pre.json"
    run_script("preprocess.py", "--conversations", "12", "--repeats", "1", "--out", str(out), tmp_path=tmp_path)
    result = json.loads(out.read_text())
    assert set(result["ways"]) == {"full", "plain", "seeds"} and result["full_vs_plain_speed_ratio_median"] > 0
    assert result["prepare_cached_s"] < result["prepare_build_s"]


def test_attention_benchmark_runs_every_variant(tmp_path):
    out = tmp_path / "attention.json"
    run_script(
        "attention.py", "--lengths", "64", "128", "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
        "--repeats", "1", "--out", str(out), tmp_path=tmp_path,
    )  # fmt: skip
    result = json.loads(out.read_text())
    rows = result["modes"]["forward"]
    assert set(rows) == {"64", "128"}
    for row in rows.values():
        assert all(row[v]["seconds_median"] > 0 for v in row) and row["HSA flex"]["ratio_to_sdpa_causal"] > 0
    assert "| 128 |" in out.with_suffix(".md").read_text()


def test_gpu_check_runs_every_phase_on_cpu(tmp_path):
    out = tmp_path / "check"
    run_script("gpu_check.py", "--device", "cpu", "--quick", "--strict", "--out", str(out), tmp_path=tmp_path)
    report = json.loads((out / "gpu_check.json").read_text())
    phases = report["phases"]
    assert list(phases) == ["P0", "P1", "P2", "P3", "P4", "P5", "P6"]
    for name, phase in phases.items():  # every phase runs on CPU (flex backward variants are skipped inside P3)
        assert phase["status"] == "ok", (name, phase["error"], [c for c in phase["checks"] if c["ok"] is False])
        assert phase["seconds"] > 0 and phase["data"]["summary"]
    assert phases["P1"]["data"]["modes"]["learnable"]["kernel_ran"] == ["sdpa"]  # auto is sdpa on CPU
    assert all(step["syncs_forward"] is None for step in phases["P1"]["data"]["modes"]["plain"]["steps"])
    assert set(phases["P2"]["data"]["rows"]) == {"eager bf16", "sdpa fp32", "sdpa bf16", "flex fp32", "flex bf16"}
    p3 = phases["P3"]["data"]["lengths"]
    assert set(p3) == {"256", "512"} and all(r["variants"]["sdpa causal"]["total_ms_median"] > 0 for r in p3.values())
    assert "skipped" in p3["256"]["variants"]["HSA flex, learnable λ"]
    assert phases["P5"]["data"]["setup"]["process_group"] == "gloo"
    p6 = phases["P6"]["data"]["setup"]
    assert p6["linear_4bit"] == 14 and p6["lambda_dtype"] == "float32"
    table = (out / "gpu_check.md").read_text()
    assert all(f"| {name} |" in table for name in phases)


def test_evidence_quick_runs_and_reports(tmp_path):
    """Issue 21's evidence at its CI size, on a recall task and the agent task, with the arms whose code paths
    differ (the baseline, λ learned per head, the type-blind tuning, the observation window; the other arms differ
    from these only by config, checked in test_config): bases, jobs recorded per item, rollouts, the report, and
    the report again from the records alone."""
    out = tmp_path / "results"
    arms = ["plain", "learnable", "type_blind", "obs_mask"]
    run_script(
        "evidence.py", "--quick", "--tasks", "mqar", "agent", "--arms", *arms, "--out", str(out), tmp_path=tmp_path
    )
    summary = json.loads((out / "evidence_quick.json").read_text())
    tasks = summary["tasks"]
    assert set(tasks) == {"mqar", "agent"} and summary["meta"]["seed_list"] == [1, 2]
    for name, task in tasks.items():
        assert list(task["arms"]) == arms, name
        for arm, row in task["arms"].items():
            for cell in row["lengths"].values():
                assert 0.0 <= cell["ci95"][0] <= cell["mean"] <= cell["ci95"][1] <= 1.0 and cell["items"] > 0
                assert (arm == "plain") == ("vs_plain" not in cell)
            assert len(row["attention_4x"]["attended"]) == 3
        assert task["type_blind_tuning"]["chosen"] in (0.25, 1.0)
        assert len(task["arms"]["learnable"]["lambdas_per_head"]) == 2
    mqar = tasks["mqar"]["arms"]  # the window leaves the 4x trajectories' old noise out
    assert mqar["obs_mask"]["context_tokens_4x"] < mqar["plain"]["context_tokens_4x"] / 2
    for row in mqar.values():  # every 1x question's prediction has a kind; "right" counts the correct ones
        assert sum(row["answers_1x"].values()) == row["lengths"]["1x"]["items"]
        assert row["answers_1x"]["right"] == round(row["lengths"]["1x"]["mean"] * row["lengths"]["1x"]["items"])
    assert "answers_1x" not in tasks["agent"]["arms"]["plain"]
    for row in tasks["agent"]["arms"].values():  # 4-action rollouts: most stop before a choice, none is lost
        assert all(c["episodes"] == row["lengths"][n]["items"] >= c["chose"] for n, c in row["choice"].items())
        assert all(row["choice_after_event"][n]["chose"] <= c["chose"] for n, c in row["choice"].items())
    records = sorted((out / "evidence_runs_quick" / "mqar").glob("*.json"))
    first = json.loads(records[0].read_text())
    assert first["command"].startswith("python -m hsa_train experiment=mqar arm=") and first["base"]["steps"] == 4
    assert (out / "evidence_quick.md").read_text().count("| (e) observation masking |") >= 4
    assert (out / "evidence_quick.png").stat().st_size > 0
    report = run_script("evidence.py", "--quick", "--report", "--tasks", "mqar", "agent", "--arms", *arms,
                        "--out", str(out), tmp_path=tmp_path)  # fmt: skip
    assert "## agent" in report.stdout and "(d)'s λ, tuned" in report.stdout


def test_recall_errors_sorts_every_question_of_a_trained_model(tmp_path):
    """recall_errors.py on a model the CLI trained (a few steps): one kind per question of the file's first records,
    and a folder without a model is refused with the fix."""
    from conftest import assert_ran, run_cli

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from evidence import QUICK

    assert_ran(run_cli("experiment=mqar_latest", *QUICK, "data.eval_sets={}", "logging.progress=none",
                       f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path))  # fmt: skip
    proc = run_script("recall_errors.py", str(tmp_path / "run" / "model"), "--lengths", "1x", "--items", "3",
                      tmp_path=tmp_path)  # fmt: skip
    counts = json.loads(proc.stdout.splitlines()[-1])["1x"]
    lines = (ROOT / "data" / "mqar" / "latest_eval_1x.jsonl").read_text().splitlines()[:3]
    questions = sum(m["role"] == "assistant" for line in lines for m in json.loads(line)["messages"])
    assert set(counts) == {"right", "older code, same door", "another door's code", "no code of the trajectory"}
    assert sum(counts.values()) == questions == 9
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "recall_errors.py"), str(tmp_path)],
                         capture_output=True, text=True, env=cli_env())  # fmt: skip
    assert bad.returncode == 2 and "no config.json there" in bad.stderr
