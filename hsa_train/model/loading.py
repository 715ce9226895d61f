"""Builds the model and tokenizer a run asks for: a real checkpoint (hub id or local folder), or a small model
initialised from an architecture description with the tokenizer shipped in the package. No per-model code: any
architecture transformers' Auto classes know goes through the same path."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoTokenizer,
    BitsAndBytesConfig,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
)

from hsa_train.model.vision import VISION_TOKENS, is_vision_config
from hsa_train.types import DTYPES, SemanticTypes, one_line

TORCH_DTYPES = dict(zip(DTYPES, (torch.float32, torch.bfloat16, torch.float16)))


def bundled_tokenizer_dir() -> Path:
    return Path(str(resources.files("hsa_train.assets") / "tokenizer"))


def bundled_image_processor_dir() -> Path:
    """The image processor a vision model built from `model.arch` uses: Qwen2-VL's settings, run by its Pillow
    backend (no torchvision)."""
    return Path(str(resources.files("hsa_train.assets") / "image_processor"))


def model_config(model_cfg):
    """The transformers config a run's model has: read from `name_or_path`, or built from `arch`."""
    if model_cfg.name_or_path:
        return AutoConfig.from_pretrained(model_cfg.name_or_path, trust_remote_code=model_cfg.trust_remote_code)
    fields = {k: plain(v) for k, v in dict(model_cfg.arch).items() if k != "type"}
    return AutoConfig.for_model(model_cfg.arch["type"], **fields)


def plain(value: Any) -> Any:
    """Config containers (OmegaConf's DictConfig / ListConfig) as plain dicts and lists: transformers' configs
    check their fields' types."""
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return [plain(v) for v in value]
    return value


def add_vision_tokens(tokenizer) -> None:
    """The shipped tokenizer, extended with a vision model's special tokens (a model built from `arch` gets their
    ids in its config)."""
    missing = [tok for tok in VISION_TOKENS.values() if tok not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)


def load_image_processor(model_cfg, overrides: Mapping[str, Any] | None = None):
    """The image processor of `name_or_path` (its preprocessor_config.json), or the shipped one for a model built
    from `arch`; `overrides` (model.image_processor, e.g. max_pixels) replace its settings. Pillow backend when
    torchvision is not installed."""
    source = model_cfg.name_or_path or str(bundled_image_processor_dir())
    kwargs = dict(overrides or {})
    try:
        return AutoImageProcessor.from_pretrained(source, trust_remote_code=model_cfg.trust_remote_code, **kwargs)
    except Exception as exc:  # OSError (missing / offline), ValueError (unknown class or setting)
        raise ValueError(
            f"cannot load the image processor from {source} ({one_line(exc, 'first', 200)}); a vision-language "
            "model needs its preprocessor_config.json beside the weights"
        ) from None


def load_tokenizer(
    name_or_path: str | None, trust_remote_code: bool = False, chat_template: str | None = None, config=None
):
    """The tokenizer at `name_or_path`, or the shipped one; given a pad token if it has none.

    `config`: the config of the model it will be saved beside. transformers 5 picks a tokenizer's class by the
    model type of the folder's config.json when there is one, and some types' classes rebuild the pre-tokenizer
    (qwen2's splits digits one by one): loaded without it, the shipped tokenizer would split text one way in
    training and another once reloaded from the exported folder, by us or by any other tool.

    `chat_template` replaces the tokenizer's template: "chatml" (the shipped ChatML template), or a path to a Jinja
    file. Base models often have none, and training needs one to know where messages begin and end."""
    source = name_or_path or str(bundled_tokenizer_dir())
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, config=config)
    except Exception as exc:  # OSError (missing / offline), ValueError (unknown class), remote code errors
        raise ValueError(
            f"cannot load the tokenizer from {source} ({one_line(exc, 'first', 200)}); check model.tokenizer / "
            "model.name_or_path (a folder with tokenizer files, or a hub id reachable from here)"
        ) from None
    if chat_template == "chatml":
        tokenizer.chat_template = (bundled_tokenizer_dir() / "chat_template.jinja").read_text(encoding="utf-8")
    elif chat_template:
        path = Path(chat_template)
        if not path.is_file():
            raise FileNotFoundError(f"model.chat_template={chat_template}: no such file; use 'chatml' or a .jinja path")
        tokenizer.chat_template = path.read_text(encoding="utf-8")
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {source} has neither a pad nor an eos token; give it a pad_token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class Processing:
    """What turns inputs into a model's tokens, loaded before the model (which is sized from it) and saved beside
    its weights: the tokenizer, with every token the model needs already added, and a vision model's image
    processor and image token (None for a text model)."""

    def __init__(self, tokenizer, image_processor=None, image_token: str | None = None):
        self.tokenizer, self.image_processor, self.image_token = tokenizer, image_processor, image_token

    def save_pretrained(self, path: str | Path) -> None:
        self.tokenizer.save_pretrained(str(path))
        if self.image_processor is not None:
            self.image_processor.save_pretrained(str(path))


def load_processing(model_cfg, config=None) -> Processing:
    """The run's tokenizer (`model.tokenizer`, else `name_or_path`'s, else the shipped one) and, when the model
    sees images (a `vision_config`), its image processor; a vision model built from `arch` gets the vision tokens
    added to the shipped tokenizer here, so the model built next is sized for them. `config`: the model's, when
    it is at hand (else read from `model_cfg`)."""
    config = config if config is not None else model_config(model_cfg)
    tokenizer = load_tokenizer(
        model_cfg.tokenizer or model_cfg.name_or_path, model_cfg.trust_remote_code, model_cfg.chat_template, config
    )
    if not is_vision_config(config):
        return Processing(tokenizer)
    if not model_cfg.name_or_path:
        add_vision_tokens(tokenizer)
    image_id = getattr(config, "image_token_id", None) if model_cfg.name_or_path else None
    image_token = tokenizer.convert_ids_to_tokens(image_id) if image_id is not None else VISION_TOKENS["image_token_id"]
    return Processing(tokenizer, load_image_processor(model_cfg, model_cfg.image_processor), image_token)


def folder_source(folder: str | Path) -> SimpleNamespace:
    """A saved model folder (a run's model/ or adapter/) as the `model` config that loads its processing."""
    return SimpleNamespace(
        name_or_path=str(folder), tokenizer=None, chat_template=None, trust_remote_code=False, image_processor={},
        arch=None,
    )  # fmt: skip


def _is_causal_lm(config) -> bool:
    auto_map = getattr(config, "auto_map", None) or {}
    if is_vision_config(config):
        return (
            config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES or "AutoModelForImageTextToText" in auto_map
        )
    return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or "AutoModelForCausalLM" in auto_map


def _auto_class(config):
    """Text models load as causal LMs, vision-language ones (a `vision_config`) as image-text-to-text models."""
    return AutoModelForImageTextToText if is_vision_config(config) else AutoModelForCausalLM


def check_model_source(model_cfg, types: SemanticTypes | None):
    """Reads only the model's config, before any slow work, and returns it (the one read: the tokenizer and the
    model take theirs from it). Fails with one line when the model cannot be trained as asked: an unknown
    architecture, one that is not a causal LM, a path that is no model folder, a hub id that cannot be reached,
    or HSA types the checkpoint was trained with that differ from `types` (a SemanticTypes: one source of truth,
    or the ids would decay the wrong tokens; None when HSA is off)."""
    examples = "e.g. qwen2, llama, mistral, gemma2, phi3"
    name = model_cfg.name_or_path
    if not name:
        arch_type = (model_cfg.arch or {}).get("type")
        if arch_type not in CONFIG_MAPPING_NAMES:
            close = difflib.get_close_matches(str(arch_type), list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES), n=3)
            hint = f"did you mean {', '.join(close)}?" if close else f"use a transformers model_type ({examples})"
            raise ValueError(f"model.arch.type={arch_type!r} is not an architecture transformers knows; {hint}")
        if (
            arch_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
            and arch_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
        ):
            raise ValueError(
                f"model.arch.type={arch_type!r} is not a causal language model (AutoModelForCausalLM cannot build "
                f"it); hsa_train trains causal LMs ({examples}) and vision-language models (qwen2_vl, qwen2_5_vl)"
            )
        return model_config(model_cfg)
    path = Path(name).expanduser()
    if path.exists() or name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:
        if not path.is_dir():
            raise ValueError(f"model.name_or_path={name}: no such folder; give a model folder or a hub id")
        if not (path / "config.json").is_file():
            raise ValueError(f"model.name_or_path={name}: the folder has no config.json (not a save_pretrained folder)")
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=model_cfg.trust_remote_code)
    except Exception as exc:  # OSError offline / not found, ValueError for unknown model types, remote code errors
        raise ValueError(
            f"model.name_or_path={name}: cannot read its config ({one_line(exc, 'first', 200)}); check the path or "
            "hub id, the network (or HF_HUB_OFFLINE=1 with a cached copy), or trust_remote_code"
        ) from None
    if not _is_causal_lm(config):
        raise ValueError(
            f"model.name_or_path={name} is a {config.model_type!r} model, not a causal language model "
            "(AutoModelForCausalLM cannot load it) nor a vision-language one (AutoModelForImageTextToText)"
        )
    stored = getattr(config, "hsa", None)
    if types is not None and stored and "types" in stored:
        trained = SemanticTypes.from_names(stored["types"], stored.get("default_type"))
        if trained != types:
            raise ValueError(
                f"the model at {name} was trained with HSA types {trained.describe()}, the run has hsa.types "
                f"{types.describe()}; ids would mean other types: set hsa.types=[{','.join(trained.names)}] "
                f"hsa.default_type={trained.default} (and a λ for each)"
            )


def build_model(
    name_or_path: str | None,
    arch: Mapping[str, Any] | None,
    tokenizer,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    config=None,
    quantization: str | None = None,
    device: torch.device | None = None,
):
    """From a checkpoint when `name_or_path` is set, else a fresh model of `arch` (a transformers config: `type`
    names the architecture, the rest are its config fields), sized to the tokenizer's vocabulary (built with its
    added tokens: `load_processing`). `config`: the checkpoint's, when `check_model_source` has read it.
    `quantization` (4bit | 8bit): the checkpoint's linear layers quantized as they load, onto `device`."""
    torch_dtype = TORCH_DTYPES[dtype]
    if name_or_path:
        return load_pretrained(name_or_path, torch_dtype, trust_remote_code, config, quantization, device)
    if quantization:
        raise ValueError(f"model.quantization={quantization} quantizes a pretrained base: set model.name_or_path")
    if not arch or "type" not in arch:
        raise ValueError("model.arch.type is required when model.name_or_path is null (e.g. qwen2)")
    fields = {k: plain(v) for k, v in arch.items() if k != "type"}
    # a vision-language config keeps the language model's fields in its text_config (transformers' layout)
    text = fields
    if "text_config" in fields:
        text = fields["text_config"] = dict(fields["text_config"])
    text.setdefault("vocab_size", len(tokenizer))
    if text["vocab_size"] < len(tokenizer):
        raise ValueError(f"model.arch.vocab_size={text['vocab_size']} < tokenizer size {len(tokenizer)}")
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        text.setdefault(key, getattr(tokenizer, key))
    if "vision_config" in fields:
        vocab = tokenizer.get_vocab()
        for key, token in VISION_TOKENS.items():
            if token not in vocab:
                raise ValueError(f"model.arch: the tokenizer has no {token} for the vision model's {key}")
            fields.setdefault(key, vocab[token])
    try:
        config = AutoConfig.for_model(arch["type"], **fields)
    except ValueError as exc:
        raise ValueError(f"model.arch.type={arch['type']!r}: {exc}") from None
    return _auto_class(config).from_config(config, dtype=torch_dtype)


def quantization_config(kind: str) -> BitsAndBytesConfig:
    """QLoRA's base: 4bit is NF4 with double quantisation (the quantisation constants quantized too) computing in
    bf16; 8bit is LLM.int8(). Output heads stay unquantized (transformers skips them)."""
    if kind == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"model.quantization={kind!r} is not allowed; use 4bit, 8bit or null")


def load_pretrained(
    path: str,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    config=None,
    quantization: str | None = None,
    device: torch.device | None = None,
):
    """A saved model, through the Auto class its config calls for (causal LM, or image-text-to-text); `config`
    when it was read already. Quantized (bitsandbytes), the weights are placed on `device` as they load."""
    if config is None:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    auto = _auto_class(config)
    extra: dict[str, Any] = {}
    if quantization:
        where = device or torch.device("cpu")
        extra = {"quantization_config": quantization_config(quantization), "device_map": {"": where}}
    return auto.from_pretrained(path, config=config, dtype=dtype, trust_remote_code=trust_remote_code, **extra)


def enable_activation_checkpointing(model) -> None:
    """Recompute each decoder layer in backward (non-reentrant, so frozen LoRA bases need no input grads).
    transformers 5 renamed the switch; older 5.x releases only have the first name."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
