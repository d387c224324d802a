"""Model builders: random-initialised Gemma 4 models from presets, real checkpoints from disk, and an
offline byte-level tokenizer. Nothing here touches a hub: real checkpoints load from a local folder or
the local HF cache only (``local_files_only=True``).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .presets import Preset, get_preset

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``torch.dtype`` from a dtype or its name ('bf16', 'bfloat16', 'fp32', ...)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}") from None


def unified_available() -> bool:
    """Whether this transformers has the encoder-free unified Gemma 4 family (``gemma4_unified``)."""
    try:
        import transformers.models.gemma4_unified  # noqa: F401
    except ImportError:
        return False
    return True


def text_config(preset: str | Preset):
    """The preset's text config object (``Gemma4TextConfig`` or ``Gemma4UnifiedTextConfig``)."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    if p.unified:
        if not unified_available():
            import transformers
            raise RuntimeError(f"preset {p.name!r} needs transformers' gemma4_unified models (>= 5.23); "
                               f"installed: {transformers.__version__}")
        from transformers.models.gemma4_unified import Gemma4UnifiedTextConfig
        return Gemma4UnifiedTextConfig(**p.text)
    from transformers import Gemma4TextConfig
    return Gemma4TextConfig(**p.text)


def full_config(preset: str | Preset):
    """The multimodal ``Gemma4Config`` (text + vision + audio encoders) of a preset that has encoders."""
    from transformers import Gemma4AudioConfig, Gemma4Config, Gemma4VisionConfig

    p = get_preset(preset) if isinstance(preset, str) else preset
    if p.unified or p.vision is None:
        raise ValueError(f"preset {p.name!r} has no vision config; use text_config()")
    return Gemma4Config(text_config=text_config(p).to_dict(), vision_config=Gemma4VisionConfig(**p.vision).to_dict(),
                        audio_config=Gemma4AudioConfig(**p.audio).to_dict() if p.audio else None)


def model_class(preset: str | Preset, multimodal: bool = False):
    """The HF class ``build_model`` instantiates for a preset."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    if p.unified:
        text_config(p)
        from transformers.models.gemma4_unified import Gemma4UnifiedForCausalLM
        return Gemma4UnifiedForCausalLM
    if multimodal:
        from transformers import Gemma4ForConditionalGeneration
        return Gemma4ForConditionalGeneration
    from transformers import Gemma4ForCausalLM
    return Gemma4ForCausalLM


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_model(preset: str | Preset, dtype: str | torch.dtype = torch.float32, device: str | torch.device = "cpu",
                seed: int = 0, *, multimodal: bool = False, attn_implementation: str = "eager",
                experts_implementation: str = "eager", num_hidden_layers: int | None = None):
    """A random-initialised Gemma 4 model of ``preset``, built directly on ``device`` in ``dtype``.

    Args:
        preset: a preset name (see ``gemma4_fast.presets.PRESETS``) or a ``Preset``.
        dtype: parameter dtype (``torch.float32``, ``torch.bfloat16``, ``torch.float16`` or a name).
        device: where parameters are created (no CPU round trip for GPU builds).
        seed: RNG seed for the initialisation (same seed, same weights).
        multimodal: build ``Gemma4ForConditionalGeneration`` (vision/audio towers too) instead of
            ``Gemma4ForCausalLM``; only for presets with encoders.
        attn_implementation: HF attention implementation recorded in the config ('eager', 'sdpa', ...).
        experts_implementation: HF experts implementation of MoE presets ('eager' — the reference loop —,
            'grouped_mm', 'batched_mm', ...).
        num_hidden_layers: keep only the first N layers (benchmarks of a few layers of a real shape).
    Returns:
        the model in eval mode. The unified family needs transformers >= 5.23 (clear error otherwise).
    """
    p = get_preset(preset) if isinstance(preset, str) else preset
    dtype = resolve_dtype(dtype)
    if multimodal:
        if num_hidden_layers is not None:
            raise ValueError("num_hidden_layers is only supported for text-only builds")
        config = full_config(p)
    else:
        config = _layer_limited_config(p, num_hidden_layers)
    config._attn_implementation = attn_implementation
    config._experts_implementation = experts_implementation
    if multimodal:
        config.text_config._attn_implementation = attn_implementation
        config.text_config._experts_implementation = experts_implementation
    cls = model_class(p, multimodal)
    config.architectures = [cls.__name__]
    torch.manual_seed(seed)
    with _default_dtype(dtype), torch.device(device):
        model = cls(config)
    return model.to(dtype=dtype).eval()


def build_model_split(preset: str | Preset, dtype: str | torch.dtype = torch.bfloat16, *,
                      device_map: dict[str, Any] | str = "balanced", n_devices: int | None = None,
                      max_memory: dict[Any, Any] | None = None, seed: int = 0, attn_implementation: str = "eager",
                      experts_implementation: str = "eager", num_hidden_layers: int | None = None):
    """A random-initialised model placed across several devices without ever holding it whole anywhere.

    The model is built on the meta device, each part is materialised directly on its device (decoder layers
    are never split), initialised there with HF's own ``_init_weights``, then dispatched with accelerate so
    activations move between devices as in ``from_pretrained(device_map=...)``. This is how a random-weight
    model larger than one GPU (31B in bf16) is built for multi-GPU runs.

    Args:
        preset, dtype, seed, attn_implementation, experts_implementation, num_hidden_layers: as ``build_model``.
        device_map: an explicit ``{module name: device}`` map, or ``"balanced"`` / ``"auto"`` to let accelerate
            place whole decoder layers given ``max_memory`` (default: all visible GPUs, or ``n_devices`` of them).
        n_devices: with a string ``device_map``, use the first ``n_devices`` GPUs.
        max_memory: per-device budget for the automatic placement (accelerate's format).
    Returns:
        the model in eval mode, with ``hf_device_map`` set.
    """
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    p = get_preset(preset) if isinstance(preset, str) else preset
    dtype = resolve_dtype(dtype)
    config = _layer_limited_config(p, num_hidden_layers)
    config._attn_implementation = attn_implementation
    config._experts_implementation = experts_implementation
    cls = model_class(p)
    config.architectures = [cls.__name__]
    with _default_dtype(dtype), torch.device("meta"):
        model = cls(config)
    if isinstance(device_map, str):
        if max_memory is None and n_devices is not None:
            if n_devices > torch.cuda.device_count():
                raise ValueError(f"n_devices={n_devices} but only {torch.cuda.device_count()} CUDA devices are visible")
            max_memory = {i: torch.cuda.get_device_properties(i).total_memory for i in range(n_devices)}
        no_split = list(getattr(model, "_no_split_modules", None) or [])
        if device_map == "balanced":
            max_memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split,
                                             dtype=dtype)
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split,
                                           dtype=dtype)
    torch.manual_seed(seed)
    for name, dev in sorted(device_map.items(), key=lambda kv: kv[0].count(".")):
        target = model.get_submodule(name) if name else model
        target.to_empty(device=torch.device(dev) if not isinstance(dev, int) else torch.device("cuda", dev))
    with torch.no_grad():
        for module in model.modules():
            model._init_weights(module)
    model.tie_weights()
    model = dispatch_model(model, device_map=device_map)
    return model.eval()


def _layer_limited_config(p: Preset, num_hidden_layers: int | None):
    """The preset's text config, keeping only the first ``num_hidden_layers`` layers when given."""
    if num_hidden_layers is None:
        return text_config(p)
    types = list(p.text["layer_types"][:num_hidden_layers])
    types[-1] = "full_attention"
    text = dict(p.text, num_hidden_layers=num_hidden_layers, layer_types=types)
    shared = min(text.get("num_kv_shared_layers", 0), num_hidden_layers - 1)
    while shared and set(types[:num_hidden_layers - shared]) != set(types):
        shared -= 1
    if "num_kv_shared_layers" in text:
        text["num_kv_shared_layers"] = shared
    return text_config(Preset(p.name, p.family, text, p.vision, p.audio, None, p.published_note, p.tiny))


def count_parameters(preset: str | Preset, *, multimodal: bool | None = None) -> int:
    """Parameter count of a preset's model, built on the meta device (no memory used).

    ``multimodal`` defaults to True for presets whose published total includes the encoders.
    """
    p = get_preset(preset) if isinstance(preset, str) else preset
    if multimodal is None:
        multimodal = p.vision is not None and "encoder" in p.published_note
    cls = model_class(p, multimodal)
    config = full_config(p) if multimodal else text_config(p)
    with torch.device("meta"):
        model = cls(config)
    seen: set[int] = set()
    total = 0
    for prm in model.parameters():
        if id(prm) not in seen:
            seen.add(id(prm))
            total += prm.numel()
    return total


def load_model(name_or_path: str, dtype: str | torch.dtype = torch.bfloat16, device: str | torch.device | None = None,
               **kwargs: Any):
    """Load a real Gemma 4 checkpoint from a local folder or the local HF cache (never downloads).

    Raises ``FileNotFoundError`` with a clear message when the checkpoint is not on disk. ``kwargs`` go to
    ``from_pretrained`` (e.g. ``attn_implementation``, ``device_map``).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = resolve_dtype(dtype)
    try:
        config = AutoConfig.from_pretrained(name_or_path, local_files_only=True)
    except OSError as exc:
        raise FileNotFoundError(
            f"checkpoint {name_or_path!r} is not a local folder nor in the local HF cache "
            f"(HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')}); download it first or pass a path"
        ) from exc
    archs = getattr(config, "architectures", None) or []
    if any("ConditionalGeneration" in a for a in archs):
        from transformers import AutoModelForImageTextToText as auto_cls
    else:
        auto_cls = AutoModelForCausalLM
    kwargs.setdefault("attn_implementation", "eager")
    model = auto_cls.from_pretrained(name_or_path, dtype=dtype, local_files_only=True, **kwargs)
    if device is not None and "device_map" not in kwargs:
        model = model.to(device)
    return model.eval()


def load_tokenizer(name_or_path: str):
    """A real checkpoint's tokenizer from disk only, with ``add_bos_token=True``."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path, local_files_only=True, add_bos_token=True)
    except OSError as exc:
        raise FileNotFoundError(f"no tokenizer for {name_or_path!r} on disk") from exc


_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>")


def offline_tokenizer(directory: str | Path | None = None):
    """A byte-level tokenizer built offline (ids: <pad>=0, <eos>=1, <bos>=2, <unk>=3, bytes 4..259).

    It is saved with ``save_pretrained`` into ``directory`` (default: a fresh temporary folder) and reloaded
    with ``add_bos_token=True``, so it has the ``name_or_path`` and BOS behaviour TransformerBridge
    requires. Fits every tiny preset (vocab 300).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_SPECIALS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")
    out = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="gemma4_fast_tok_"))
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return AutoTokenizer.from_pretrained(str(out), add_bos_token=True, padding_side="left")
