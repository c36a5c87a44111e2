"""Which peers the one-shot GPU run can compare against: each is imported the way its benchmark uses it.

The GPU image has none of them preinstalled; ``benchmarks/gpu_run.sh`` installs them from the wheel folder that
``benchmarks/wheels.py`` fills. A peer that does not import is reported as missing (with the import error) and every
case that needs it is recorded as skipped, naming it; the run goes on.
"""

from __future__ import annotations

import importlib
import importlib.metadata

# peer distribution -> (module, attribute the benchmark uses)
PEERS: dict[str, tuple[str, str]] = {
    "trl": ("trl", "DPOTrainer"),
    "liger-kernel": ("liger_kernel.transformers", "LigerFusedLinearCrossEntropyLoss"),
    "cut-cross-entropy": ("cut_cross_entropy", "linear_cross_entropy"),
    "flash-attn": ("flash_attn", "flash_attn_varlen_func"),
}
# benchmark implementation name -> peer distribution
IMPL_PEER = {"trl": "trl", "liger": "liger-kernel", "cce": "cut-cross-entropy", "flash_attention_2": "flash-attn"}
# the peers each section compares against
SECTION_PEERS = {"logprobs": (), "head": ("trl", "liger-kernel", "cut-cross-entropy"), "dpo": ("trl", "flash-attn")}


def peer_status(sections: list[str]) -> dict[str, str]:
    """For the peers ``sections`` use: ``{distribution: version}`` if it imports, else ``"missing: <error>"``."""
    status = {}
    for dist, (module, attr) in PEERS.items():
        if not any(dist in SECTION_PEERS[s] for s in sections):
            continue
        try:
            getattr(importlib.import_module(module), attr)
            status[dist] = importlib.metadata.version(dist)
        except Exception as exc:  # ImportError, or anything a half-installed package raises at import
            status[dist] = f"missing: {type(exc).__name__}: {exc}"[:200]
    return status


def skip_reason(impl: str, status: dict[str, str]) -> str | None:
    """``"skipped: peer X missing (...)"`` when ``impl`` needs a peer that did not import, else ``None``."""
    dist = IMPL_PEER.get(impl)
    if dist is None or not status.get(dist, "missing").startswith("missing"):
        return None
    return f"skipped: peer {dist} {status.get(dist, 'missing')}"
