"""A plain `pip install .` must carry the configs, the demo data and the tokenizer inside the package."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _local_setuptools_is_enough() -> bool:
    try:
        import setuptools
    except ImportError:
        return False
    return int(setuptools.__version__.split(".")[0]) >= 69


def test_wheel_ships_configs_data_and_tokenizer(tmp_path):
    # Build with the setuptools already here when it is recent enough (no download), else in pip's isolation.
    isolation = ["--no-build-isolation"] if _local_setuptools_is_enough() else []
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("hsa_train-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    groups = ("model/tiny_qwen2", "model/tiny_qwen2_vl", "experiment/vl_demo", "data/demo", "hsa/default")
    for group in (*groups, "train/default", "logging/default"):
        assert f"hsa_train/conf/{group}.yaml" in names
    assert "hsa_train/conf/config.yaml" in names
    assert "hsa_train/bundled/demo/trajectories.jsonl" in names
    # the vision demo: its records and every image they name
    for split in ("train", "eval"):
        rows = (ROOT / "data" / "vl_demo" / f"{split}.jsonl").read_text().splitlines()
        assert f"hsa_train/bundled/vl_demo/{split}.jsonl" in names
        images = {p for row in rows for p in json.loads(row)["images"]}
        assert {f"hsa_train/bundled/vl_demo/{p}" for p in images} <= names
    assert "hsa_train/assets/image_processor/preprocessor_config.json" in names
    assert {
        "hsa_train/assets/tokenizer/tokenizer.json",
        "hsa_train/assets/tokenizer/tokenizer_config.json",
        "hsa_train/assets/tokenizer/chat_template.jinja",
    } <= names
