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


# Packages that change their internals between minor releases, which HSA reaches into (attention and mask
# registries, FSDP2, flex, peft's wrappers, datasets' Arrow): each needs an upper bound that CI has passed on.
FAST_MOVING = ("torch", "transformers", "peft", "datasets", "fastapi", "uvicorn", "openai", "minigrid", "bitsandbytes")


def _requirements():
    import tomllib
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    listed = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        listed += extra
    return [Requirement(r) for r in listed]


def test_fast_moving_packages_have_an_upper_bound():
    by_name = {r.name.lower(): r for r in _requirements()}
    for name in FAST_MOVING:
        operators = {s.operator for s in by_name[name].specifier}
        assert operators & {"<", "<=", "~=", "=="}, f"{name} has no upper bound in pyproject.toml: {by_name[name]}"


def test_installed_versions_are_inside_the_bounds():
    """An older copy already installed (or one pinned by hand) must not hide what a fresh machine resolves: every
    installed requirement of the project is inside its range, and the README names the tested versions."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    outside = []
    for req in _requirements():
        try:
            installed = Version(version(req.name))
        except PackageNotFoundError:
            continue  # an optional extra this environment did not install
        if not req.specifier.contains(installed, prereleases=True):
            outside.append(f"{req.name} {installed} (pyproject.toml asks {req.specifier})")
    assert not outside, "installed versions outside the project's bounds: " + "; ".join(outside)
    readme = (ROOT / "README.md").read_text()
    for name in FAST_MOVING:  # a patch release inside the bounds needs no README change; a minor one does
        release = Version(version(name)).release
        assert f"{name} {release[0]}.{release[1]}." in readme, f"README's tested versions do not name {name} {release}"
