"""fastdpo: fast, lean Direct Preference Optimization.

The names below are the ones the README shows. They are imported when first used (``import fastdpo`` loads neither
torch nor transformers); the ``TYPE_CHECKING`` block gives type checkers and IDEs the same names. Everything else is
imported from the module that owns it: :mod:`fastdpo.head` (the fused LM head), :mod:`fastdpo.losses` (the loss
zoo), :mod:`fastdpo.reference` (naive oracles), :mod:`fastdpo.nn` (drop-in modules), :mod:`fastdpo.ref_cache`,
:mod:`fastdpo.attention`, :mod:`fastdpo.integrations.trl`.
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from fastdpo import nn
    from fastdpo.collator import PreferenceCollator
    from fastdpo.engine import DPOEngine
    from fastdpo.head import linear_sequence_logprobs, linear_token_logprobs
    from fastdpo.logprobs import sequence_logprobs, token_logprobs
    from fastdpo.losses import PreferenceLossConfig, preference_loss

_EXPORTS: dict[str, str] = {
    "sequence_logprobs": "fastdpo.logprobs",
    "token_logprobs": "fastdpo.logprobs",
    "linear_sequence_logprobs": "fastdpo.head",
    "linear_token_logprobs": "fastdpo.head",
    "preference_loss": "fastdpo.losses",
    "PreferenceLossConfig": "fastdpo.losses",
    "PreferenceCollator": "fastdpo.collator",
    "DPOEngine": "fastdpo.engine",
    "nn": "fastdpo.nn",
}

# Names ``fastdpo`` exported before the README's set was fixed: still resolved, with a DeprecationWarning naming the
# module to import them from.
_MOVED: dict[str, str] = {
    "naive_sequence_logprobs": "fastdpo.reference",
    "naive_linear_token_logprobs": "fastdpo.reference",
    "linear_logprobs_loss_grad_in_forward": "fastdpo.head",
    "TokenStats": "fastdpo.head",
    "SegmentStats": "fastdpo.head",
    "LOSS_TYPES": "fastdpo.losses",
    "simpo_loss": "fastdpo.losses",
    "cpo_loss": "fastdpo.losses",
    "orpo_loss": "fastdpo.losses",
    "kto_loss": "fastdpo.losses",
    "wpo_weights": "fastdpo.losses",
    "ld_logps": "fastdpo.losses",
    "ld_token_weights": "fastdpo.losses",
    "build_attention_kwargs": "fastdpo.attention",
    "RefLogpCache": "fastdpo.ref_cache",
}

__all__ = [
    "DPOEngine",
    "PreferenceCollator",
    "PreferenceLossConfig",
    "__version__",
    "linear_sequence_logprobs",
    "linear_token_logprobs",
    "nn",
    "preference_loss",
    "sequence_logprobs",
    "token_logprobs",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        module = _MOVED.get(name)
        if module is None:
            raise AttributeError(f"module 'fastdpo' has no attribute {name!r}")
        warnings.warn(f"fastdpo.{name} is deprecated: import it from {module}", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(module), name)
    mod = importlib.import_module(module)
    value = mod if module.endswith("." + name) else getattr(mod, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
