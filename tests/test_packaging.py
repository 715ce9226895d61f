"""A plain `pip install .` must carry the configs, the demo data and the tokenizer inside the package."""

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
    for group in ("model/tiny_qwen2", "data/demo", "hsa/default", "train/default", "logging/default"):
        assert f"hsa_train/conf/{group}.yaml" in names
    assert "hsa_train/conf/config.yaml" in names
    assert "hsa_train/bundled/demo/trajectories.jsonl" in names
    assert {
        "hsa_train/assets/tokenizer/tokenizer.json",
        "hsa_train/assets/tokenizer/tokenizer_config.json",
        "hsa_train/assets/tokenizer/chat_template.jinja",
    } <= names
