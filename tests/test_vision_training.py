"""Training a vision-language model from the command line: LLaMA-Factory's mllm_demo, full and LoRA fine-tuning
from a local save_pretrained folder, exact resume, and DDP / FSDP2 over 2 gloo processes with images."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_ran, cli_env, run_cli, run_torchrun

from hsa_train.config import bundled_path

SMALL = [
    "model=tiny_qwen2_vl",
    "model.arch.text_config.hidden_size=32",
    "model.arch.text_config.intermediate_size=64",
    "model.arch.text_config.num_hidden_layers=2",
    "model.arch.text_config.rope_parameters.mrope_section=[1,1,2]",
    "model.arch.vision_config.depth=1",
    "model.arch.vision_config.embed_dim=32",
    "model.arch.vision_config.hidden_size=32",
    "logging.progress=none",
]


def vl_subset(path: Path, n: int) -> Path:
    """The first `n` bundled vl_demo trajectories, image paths made absolute (the file lives elsewhere)."""
    source = Path(bundled_path("vl_demo/train.jsonl"))
    rows = [json.loads(line) for line in source.read_text().splitlines()[:n]]
    for row in rows:
        row["images"] = [str(source.parent / p) for p in row["images"]]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def vl_data(tmp_path_factory) -> Path:
    return vl_subset(tmp_path_factory.mktemp("vl") / "vl.jsonl", 16)


def metrics_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def run_vl(tmp_path: Path, name: str, *args: str) -> dict:
    """`python -m hsa_train` on the small vision model with `args`; its metrics."""
    proc = run_cli(*SMALL, *args, f"hydra.run.dir={tmp_path / name}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return metrics_of(tmp_path / name)


def train(tmp_path: Path, name: str, data: Path, *extra: str) -> dict:
    return run_vl(
        tmp_path, name, f"data.train_files=[{data}]", "data.eval_ratio=0.25", "train.micro_batch_size=4", *extra
    )


def test_mllm_demo_trains_packed_and_unpacked(tmp_path, peer_data):
    """LLaMA-Factory's own multimodal demo, read through its dataset_info.json: every record with its images."""
    for packing in ("false", "true"):
        metrics = run_vl(
            tmp_path,
            packing,
            f"data.dataset_info={peer_data / 'dataset_info.json'}",
            "data.datasets=[mllm_demo]",
            "data.train_files=[]",
            "data.eval_ratio=0",
            f"data.packing={packing}",
            "train.max_steps=2",
            "train.micro_batch_size=2",
        )
        rows = json.loads((peer_data / "mllm_demo.json").read_text())
        assert metrics["samples_train"] == len(rows) and metrics["skipped_records"] == 0
        assert all(loss == loss and loss < 20 for loss in metrics["train_losses"])


def test_images_in_a_text_model_stop_the_run_with_file_and_line(tmp_path, vl_data):
    proc = run_cli(f"data.train_files=[{vl_data}]", f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert proc.returncode != 0
    assert f"{vl_data}:1: image in a text-only model: message 2 holds images" in proc.stderr


def test_missing_image_is_named_or_skipped(tmp_path, vl_data):
    rows = [json.loads(line) for line in vl_data.read_text().splitlines()]
    rows[3]["images"][1] = str(tmp_path / "gone.png")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(row) + "\n" for row in rows))
    proc = run_cli(*SMALL, f"data.train_files=[{bad}]", f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert (
        proc.returncode != 0 and f"{bad}:4: missing image: message 4 image 0 is {tmp_path / 'gone.png'}" in proc.stderr
    )
    metrics = train(tmp_path, "skip", bad, "data.on_error=skip", "train.max_steps=1")
    assert metrics["skipped_records"] == 1 and metrics["samples_train"] + metrics["samples_eval"] == 15


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, vl_data) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("full")
    args = ("train.max_steps=4", "train.warmup_steps=0", "train.save_every=2", "train.keep_last=null")
    return tmp, train(tmp, "full", vl_data, *args)


def test_full_finetuning_trains_the_vision_tower_and_resumes_exactly(full_run, vl_data):
    tmp, metrics = full_run
    assert metrics["params_trained"] == metrics["params"]  # freeze_vision defaults to false without LoRA
    assert metrics["train_losses"][-1] < metrics["train_losses"][0]
    model_dir = Path(metrics["model_dir"])
    assert (model_dir / "preprocessor_config.json").is_file() and (model_dir / "tokenizer.json").is_file()
    resumed = train(
        tmp,
        "resumed",
        vl_data,
        "train.max_steps=4",
        "train.warmup_steps=0",
        f"train.resume={tmp / 'full/checkpoints/step_0000002'}",
    )
    assert resumed["train_losses"] == metrics["train_losses"]
    assert resumed["eval_loss"] == pytest.approx(metrics["eval_loss"], abs=1e-9)


def test_lora_on_a_local_vl_checkpoint_freezes_the_vision_tower(full_run, vl_data):
    """model.name_or_path = the full run's folder (weights, tokenizer, image processor): LoRA adapts the language
    model, the vision tower is frozen by default and gets no adapters; the adapter loads back with HSA on."""
    import torch

    from hsa_train.model.export import load_exported
    from hsa_train.model.vision import vision_tower

    tmp, full = full_run
    lora = train(
        tmp,
        "lora",
        vl_data,
        f"model.name_or_path={full['model_dir']}",
        "model.lora.enabled=true",
        "model.lora.r=4",
        "train.max_steps=2",
    )
    assert lora["params_trained"] < lora["params"] / 5
    model = load_exported(lora["adapter_dir"])
    tower = vision_tower(model.get_base_model())
    assert not any("lora_" in name for name, _ in tower.named_parameters())
    assert any("lora_" in name for name, _ in model.named_parameters())
    assert lora["train_loss_first"] < full["train_loss_first"] - 0.3  # starts from the trained weights
    assert torch.isfinite(torch.tensor(lora["train_losses"])).all()


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one_with_images(tmp_path, vl_data, mode):
    """DDP trains everything; FSDP2 with the vision tower frozen (shards of frozen vision blocks beside trained
    decoder layers)."""
    frozen = [f"model.freeze_vision={mode == 'fsdp'}"]
    common = [*SMALL, f"data.train_files=[{vl_data}]", "data.eval_ratio=0.25", "train.max_steps=3", *frozen]
    single = train(tmp_path, "single", vl_data, "train.micro_batch_size=4", "train.max_steps=3", *frozen)
    assert (single["params_trained"] < single["params"]) == (mode == "fsdp")
    args = [*common, "train.micro_batch_size=2", f"train.distributed={mode}", f"hydra.run.dir={tmp_path / mode}"]
    assert_ran(run_torchrun(*args, cwd=tmp_path))
    run = metrics_of(tmp_path / mode)
    assert run["distributed"] == mode and run["world_size"] == 2
    assert run["train_losses"] == pytest.approx(single["train_losses"], abs=1e-5)
    assert run["eval_loss"] == pytest.approx(single["eval_loss"], abs=1e-5)
    assert run["tokens_seen"] == single["tokens_seen"]


def test_generate_cli_replies_to_conversations_with_images(full_run, vl_data, tmp_path):
    """python -m hsa_train.generate on a vision run's folder: each conversation's images go in with its prompt;
    the output keeps them (LLaMA-Factory's layout), so it is valid input again."""
    _, full = full_run
    rows = [json.loads(line) for line in vl_data.read_text().splitlines()[:3]]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "hsa_train.generate", full["model_dir"], "--input", str(source), "--output", str(out)]
    proc = subprocess.run([*cmd, "--max-new-tokens", "4"], env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [w["images"] for w in written] == [row["images"] for row in rows]
    assert all(w["reply"]["content"] is not None and w["reference"] for w in written)
    assert all(w["prompt_tokens"] > 100 for w in written)  # the vision tokens are in the prompt


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_text_only_samples_train_beside_images_on_two_ranks(tmp_path, vl_data, mode):
    """Mixed data: a rank whose micro-batch has no image would skip the vision tower the other rank runs (FSDP
    would hang, DDP stop mid-step); the collator adds a label-less blank image row there instead, and the run
    matches one process: losses, evaluation, and the final answers decoded in step (eval.generate)."""
    demo = Path(bundled_path("demo/trajectories.jsonl")).read_text().splitlines()
    rows = vl_data.read_text().splitlines()
    mixed = tmp_path / "mixed.jsonl"  # text-only records where whole micro-batches (and eval rows) get no image
    mixed.write_text("\n".join([*demo[:6], *rows[:2], *demo[6:12], *rows[2:4]]) + "\n")
    common = [f"data.train_files=[{mixed}]", "data.eval_ratio=0.25", "train.max_steps=3", "eval.generate=true"]
    common += ["data.cutoff_len=4096", "train.eval_batch_size=2"]
    single = run_vl(tmp_path, "single", *common, "train.micro_batch_size=4")
    args = [
        *SMALL,
        *common,
        "train.micro_batch_size=2",
        f"train.distributed={mode}",
        f"hydra.run.dir={tmp_path / mode}",
    ]
    assert_ran(run_torchrun(*args, cwd=tmp_path))
    run = metrics_of(tmp_path / mode)
    # the filler rows change matrix shapes, hence fp32 rounding: 1e-4 is far below what a wrong loss would move
    assert run["train_losses"] == pytest.approx(single["train_losses"], abs=1e-4)
    assert run["eval_loss"] == pytest.approx(single["eval_loss"], abs=1e-4)
    assert run["eval_exact_match"] == single["eval_exact_match"] and run["samples_eval"] == single["samples_eval"]
    assert run["tokens_seen"] == single["tokens_seen"]  # the blank image rows are not counted as data


def test_chat_attaches_pictures_to_the_next_user_turn(full_run, vl_data, tmp_path, monkeypatch):
    """`/image PATH` in the chat: the picture goes in with the next message, as a `<image>` placeholder and the
    message's `images` (so its tokens take that turn's type). A missing file, a file that is no picture and a
    picture the processor refuses are named in one line; the conversation goes on without them."""
    import argparse
    import io

    from PIL import Image

    from hsa_train.agent.folder import load_trained
    from hsa_train.data import SemanticTokenizer
    from hsa_train.generate import _image_problem, chat
    from hsa_train.model.loading import load_tokenizer

    _, metrics = full_run
    trained = load_trained(metrics["model_dir"])
    st = trained.st
    scene = json.loads(vl_data.read_text().splitlines()[0])["images"][0]
    not_a_picture = tmp_path / "notes.png"
    not_a_picture.write_text("hello")
    wide = tmp_path / "wide.png"
    Image.new("RGB", (3000, 20)).save(wide)  # 1344 x 28 after Qwen's resize: over the tiny processor's max_pixels
    sent = []
    encode = st.encode_prompt
    monkeypatch.setattr(
        st, "encode_prompt", lambda conv, **kw: sent.append([dict(m) for m in conv]) or encode(conv, **kw)
    )
    script = [
        f"/image {tmp_path / 'gone.png'}",
        f"/image {not_a_picture}",
        f"/image {scene}",
        "Which corner?",
        f"/image {wide}",
        "and now?",
        "plain text",
        "/quit",
    ]
    out = io.StringIO()
    args = argparse.Namespace(model=metrics["model_dir"], max_new_tokens=2, sample=False, user_type=None, typing=None)
    chat(trained, args, io.StringIO("\n".join(script) + "\n"), out)
    text = out.getvalue()
    assert f"no such image file: {tmp_path / 'gone.png'}" in text and f"unreadable image: {not_a_picture}" in text
    assert "image 1 goes with your next message" in text and "not sent: image too large" in text
    assert text.count("model> ") == 2  # the turn with the scene, and "plain text"
    first, refused, last = sent
    assert first[-1]["content"] == "<image>Which corner?" and first[-1]["images"] == [str(Path(scene).resolve())]
    assert refused[-1]["images"] == [str(wide.resolve())]
    assert [m["content"] for m in last] == [first[-1]["content"], last[1]["content"], "plain text"]  # refused: gone
    assert last[0]["images"] == first[-1]["images"] and "images" not in last[-1]
    text_only = SemanticTokenizer(load_tokenizer(None))
    assert _image_problem(text_only, scene) == "this model takes no images (it is a text-only model)"
