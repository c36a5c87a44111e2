"""The shape of a decoder-only causal LM as the memory model (:mod:`fastdpo.memory`) needs it: read from an HF
``config.json`` (or a preset), validated, and its parameter counts.

Presets: Llama-3-8B, Llama-3.2-1B, Qwen2.5-0.5B, Gemma-2-2B (their HF configs' fields). A config's sizes must be
positive integers and ``num_attention_heads`` a multiple of ``num_key_value_heads``; a multimodal config's
``text_config`` is used. Parameters per decoder layer: attention ``D·q + 2·D·kv + q·D`` (``q = heads·head_dim``,
``kv = kv_heads·head_dim``; plus biases), MLP ``3·D·I`` (gate, up, down), ``norms_per_layer·D``; plus the embedding
``V·D``, the final norm ``D`` and, untied, the LM head ``V·D``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a decoder-only causal LM (names follow HF configs)."""

    name: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    tie_word_embeddings: bool
    attention_bias: bool = False  # q/k/v (and o for llama-style attention_bias) biases
    final_logit_softcapping: float | None = None
    attention_layer_types: int = 1  # distinct attention layer types (full / sliding): one packed-row mask each

    @property
    def norms_per_layer(self) -> int:
        return 4 if self.model_type in ("gemma2", "gemma3_text") else 2

    @property
    def eager_attention(self) -> bool:
        """Gemma-2 soft-caps attention scores, which needs the eager (materialized scores) attention."""
        return self.model_type == "gemma2"


def _hf_config(
    model_type: str,
    vocab_size: int,
    hidden_size: int,
    intermediate_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    head_dim: int,
    tie_word_embeddings: bool,
    rms_norm_eps: float,
    max_position_embeddings: int,
    **extra: Any,
) -> dict[str, Any]:
    """A decoder's HF ``config.json`` fields, positionally in this order (plus the model type's own ``extra``)."""
    return {k: v for k, v in locals().items() if k != "extra"} | extra


# model_type, vocab, hidden, intermediate, layers, heads, kv heads, head_dim, tied, rms_norm_eps, max positions
PRESETS: dict[str, dict[str, Any]] = {
    "Llama-3-8B": _hf_config("llama", 128256, 4096, 14336, 32, 32, 8, 128, False, 1e-5, 8192, rope_theta=500000.0),
    "Llama-3.2-1B": _hf_config("llama", 128256, 2048, 8192, 16, 32, 8, 64, True, 1e-5, 131072, rope_theta=500000.0),
    "Qwen2.5-0.5B": _hf_config("qwen2", 151936, 896, 4864, 24, 14, 2, 64, True, 1e-6, 32768, rope_theta=1000000.0),
    "Gemma-2-2B": _hf_config("gemma2", 256000, 2304, 9216, 26, 8, 4, 256, True, 1e-6, 8192)
    | dict(final_logit_softcapping=30.0, attn_logit_softcapping=50.0, query_pre_attn_scalar=256, sliding_window=4096),
}


def shape_from_config(config: dict[str, Any], name: str = "custom") -> ModelShape:
    """A :class:`ModelShape` from an HF ``config.json`` dict (``text_config`` of multimodal configs is used).
    ``ValueError`` naming the field for a missing, non-integer or non-positive size."""
    cfg = config.get("text_config", config) if isinstance(config, dict) else config
    if not isinstance(cfg, dict):
        raise ValueError(f"config {name!r} is not a JSON object")
    for key in ("hidden_size", "num_attention_heads", "vocab_size", "intermediate_size", "num_hidden_layers"):
        if key not in cfg:
            raise ValueError(
                f"config {name!r} lacks {key!r} (need vocab_size, hidden_size, intermediate_size, "
                "num_hidden_layers, num_attention_heads)"
            )

    def size(key: str, default: Any = None) -> int:
        value = cfg.get(key) if cfg.get(key) is not None else default
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"config {name!r}: {key} must be a positive integer, got {value!r}")
        return value

    hidden, heads = size("hidden_size"), size("num_attention_heads")
    kv_heads = size("num_key_value_heads", heads)
    if heads % kv_heads:
        raise ValueError(
            f"config {name!r}: num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})"
        )
    softcap = cfg.get("final_logit_softcapping")
    if softcap is not None and (
        isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not math.isfinite(softcap) or softcap <= 0
    ):
        raise ValueError(f"config {name!r}: final_logit_softcapping must be a positive number or null, got {softcap!r}")
    return ModelShape(
        name=name,
        model_type=str(cfg.get("model_type", "llama")),
        vocab_size=size("vocab_size"),
        hidden_size=hidden,
        intermediate_size=size("intermediate_size"),
        num_hidden_layers=size("num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=size("head_dim", hidden // heads if hidden >= heads else None),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", cfg.get("model_type") in ("gemma2", "qwen2"))),
        attention_bias=bool(cfg.get("attention_bias", False)) or cfg.get("model_type") == "qwen2",
        final_logit_softcapping=softcap,
        attention_layer_types=_attention_layer_types(cfg),
    )


def _attention_layer_types(cfg: dict[str, Any]) -> int:
    """Distinct attention layer types of a config: its ``layer_types`` when given, else 2 for Gemma-2/3 (HF builds
    alternating sliding / full layers), else 1."""
    if cfg.get("layer_types"):
        return len(set(cfg["layer_types"]))
    return 2 if cfg.get("model_type") in ("gemma2", "gemma3_text") else 1


def load_model(spec: str) -> tuple[ModelShape, dict[str, Any]]:
    """``spec``: a preset name (case-insensitive) or a path to a ``config.json`` (or a folder holding one).
    ``ValueError`` naming ``spec`` when it is neither, unreadable or not valid JSON."""
    for name, cfg in PRESETS.items():
        if spec.lower() == name.lower():
            return shape_from_config(cfg, name), dict(cfg)
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"model {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json path")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"model {spec!r}: cannot read {path} ({exc})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"model {spec!r}: {path} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    return shape_from_config(cfg, str(spec)), cfg


def param_counts(m: ModelShape) -> dict[str, int]:
    """Parameter counts: ``embed`` (V·D), ``layers`` (all decoder layers), ``final_norm``, ``lm_head`` (0 if tied),
    ``total``, and ``largest`` (the largest single tensor: the embedding)."""
    d, q, kv = m.hidden_size, m.num_attention_heads * m.head_dim, m.num_key_value_heads * m.head_dim
    attn = d * q + 2 * d * kv + q * d
    if m.attention_bias:
        attn += q + 2 * kv + (d if m.model_type != "qwen2" else 0)
    mlp = 3 * d * m.intermediate_size
    layer = attn + mlp + m.norms_per_layer * d
    embed = m.vocab_size * d
    lm_head = 0 if m.tie_word_embeddings else m.vocab_size * d
    total = embed + m.num_hidden_layers * layer + d + lm_head
    return {
        "embed": embed,
        "layer": layer,
        "layers": m.num_hidden_layers * layer,
        "final_norm": d,
        "lm_head": lm_head,
        "total": total,
        "largest": embed,
    }
