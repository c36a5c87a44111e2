"""fastdpo: fast, lean Direct Preference Optimization.

Public names are resolved lazily so that ``import fastdpo`` stays cheap (no transformers import until the engine
or collator is used).
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "sequence_logprobs": "fastdpo.logprobs",
    "token_logprobs": "fastdpo.logprobs",
    "naive_sequence_logprobs": "fastdpo.reference",
    "linear_sequence_logprobs": "fastdpo.head",
    "linear_token_logprobs": "fastdpo.head",
    "naive_linear_token_logprobs": "fastdpo.reference",
    "linear_logprobs_loss_grad_in_forward": "fastdpo.head",
    "TokenStats": "fastdpo.head",
    "SegmentStats": "fastdpo.head",
    "preference_loss": "fastdpo.losses",
    "LOSS_TYPES": "fastdpo.losses",
    "simpo_loss": "fastdpo.losses",
    "cpo_loss": "fastdpo.losses",
    "orpo_loss": "fastdpo.losses",
    "kto_loss": "fastdpo.losses",
    "wpo_weights": "fastdpo.losses",
    "ld_logps": "fastdpo.losses",
    "ld_token_weights": "fastdpo.losses",
    "PreferenceCollator": "fastdpo.collator",
    "build_attention_kwargs": "fastdpo.attention",
    "DPOEngine": "fastdpo.engine",
    "RefLogpCache": "fastdpo.ref_cache",
    "nn": "fastdpo.nn",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fastdpo' has no attribute {name!r}")
    mod = importlib.import_module(module)
    value = mod if module.endswith("." + name) else getattr(mod, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
