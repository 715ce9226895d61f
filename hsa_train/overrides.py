"""A look at the command line before Hydra composes it, so a mistyped key gets one actionable line.

Hydra refuses an override of a key the config does not have, but its message spans several lines and offers no
correction. This check only reads: it composes the config the overrides select and, for the first plain
`key=value` whose key does not exist, returns a one-line message with the closest existing keys. Anything it does
not understand (flags, sweeps over config groups, package overrides) is left to Hydra.
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from hsa_train.config import RENAMED

_MISSING = object()


def _exists(cfg: DictConfig, key: str) -> bool:
    """Whether `key` is in the config, with a value or one still to give (`???`)."""
    try:
        return OmegaConf.select(cfg, key, default=_MISSING, throw_on_missing=True) is not _MISSING
    except MissingMandatoryValue:
        return True


_FLAGS_WITH_VALUES = {"-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir", "--experimental-rerun"}


def _config_groups() -> set[str]:
    root = Path(str(resources.files("hsa_train.conf")))
    return {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("_")}


def _leaf_keys(cfg: DictConfig | ListConfig, prefix: str = "") -> list[str]:
    """Every key's dotted path, list entries by index (data.datasets.0.path)."""
    keys = []
    for key in cfg.keys() if isinstance(cfg, DictConfig) else range(len(cfg)):
        path = f"{prefix}{key}"
        node = cfg._get_node(key)
        keys.append(path)
        if isinstance(node, (DictConfig, ListConfig)) and not node._is_missing() and not node._is_none():
            keys.extend(_leaf_keys(node, path + "."))
    return keys


def unknown_key_message(argv: list[str]) -> str | None:
    """The one-line error for the first override of a key that does not exist, or None."""
    if any(a in _FLAGS_WITH_VALUES or a.startswith("--config") for a in argv):
        return None
    args = [a for a in argv if not a.startswith("-")]
    try:
        from hydra import compose, initialize_config_module
        from hydra.core.override_parser.overrides_parser import OverridesParser

        overrides = OverridesParser.create().parse_overrides(args)
        groups = _config_groups()
        choices = [o for o in overrides if o.key_or_group in groups]
        if any(o.is_sweep_override() or o.package is not None for o in choices):
            return None
        with initialize_config_module(config_module="hsa_train.conf", version_base="1.3"):
            cfg = compose(config_name="config", overrides=[o.input_line for o in choices])
    except Exception:  # a syntax error or anything else: Hydra will report it in its own words
        return None
    for o in overrides:
        key = o.key_or_group
        if o.is_add() or o.is_delete() or o.package is not None or key in groups or "/" in key:
            continue
        if key == "hydra" or key.startswith("hydra."):
            continue
        if _exists(cfg, key):
            continue
        if key in RENAMED:
            return f"{key} was renamed: use {RENAMED[key]}"
        close = difflib.get_close_matches(key, _leaf_keys(cfg), n=2, cutoff=0.6)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        return f"unknown config key '{key}' in '{o.input_line}'; {hint}(to add a new key, write +{o.input_line})"
    return None
