"""Workloads and the implementations the benchmark compares.

Three workloads, each a forward + backward with a random upstream gradient:

* ``head`` — per-token log-probs of ``hidden @ weight.T``: ``hidden [N, D]`` and ``weight [V, D]`` (both requiring
  grad), ``labels [N]`` int64 in ``[0, V)``; output ``[N]`` fp32. Implementations: naive PyTorch (materialized logits,
  ``log_softmax`` in fp32, gather), ``fastdpo.linear_token_logprobs``, TRL 1.16's ``ChunkedLogProbFunction``, torch's
  chunked ``F.linear_cross_entropy(reduction="none", options=LinearCrossEntropyOptions())`` (log-prob = −loss),
  Apple's Cut Cross-Entropy and Liger's ``LigerFusedLinearCrossEntropyLoss(reduction="none")`` (CUDA only, where
  installed).
* ``logprobs`` — per-sequence log-probs from logits ``[B, T, V]`` (requiring grad) and labels ``[B, T]`` whose first
  quarter of each row is ``-100`` (the prompt); output ``[B]`` fp32. Naive PyTorch, ``fastdpo.sequence_logprobs`` and
  TRL's ``selective_log_softmax``.
* ``dpo`` — the sigmoid DPO loss of a fused linear head: policy ``hidden [2P, T, D]`` and ``weight [V, D]`` requiring
  grad, a frozen reference ``hidden``/``weight``, targets ``[2P, T]`` with the first quarter of each row ``-100``;
  output a scalar. Naive PyTorch, ``fastdpo.nn.FusedLinearDPOLoss`` and Liger's ``LigerFusedLinearDPOLoss``.

Every implementation is a :class:`Impl`; :meth:`Impl.unavailable` names why it cannot run here (missing package, no
CUDA) instead of raising, so the driver can report it.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastdpo.reference import naive_dpo_loss, naive_linear_token_logprobs, naive_sequence_logprobs

WORKLOADS = ("head", "logprobs", "dpo")
TRL_CHUNK_SIZE = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE in TRL 1.16
DPO_BETA = 0.1


@dataclass(frozen=True)
class Shape:
    """One benchmark shape: ``tokens`` N (= B·T for logprobs, 2P·T for dpo), ``hidden`` D, ``vocab`` V."""

    tokens: int
    hidden: int
    vocab: int

    def rows(self, workload: str) -> tuple[int, int]:
        """``(rows, row_length)`` of the 3-D workloads: ``logprobs`` rows of at most 512 tokens; ``dpo`` an even
        number of rows (chosen, then rejected) of at most 256 tokens. ``rows * row_length <= tokens``."""
        if workload == "dpo":
            t = max(1, min(256, self.tokens // 2))
            return max(2, 2 * (self.tokens // (2 * t))), t
        t = max(1, min(512, self.tokens))
        return max(1, self.tokens // t), t

    def normalized(self, workload: str) -> Shape:
        """The shape with ``tokens`` rounded to what the workload actually builds (rows × row length)."""
        if workload == "head":
            return self
        rows, t = self.rows(workload)
        return Shape(rows * t, self.hidden if workload == "dpo" else 0, self.vocab)


@dataclass
class Problem:
    """Inputs of one case. ``leaves`` are the tensors whose ``.grad`` backward fills (and the driver clears)."""

    inputs: dict[str, torch.Tensor]
    leaves: tuple[torch.Tensor, ...]
    upstream: torch.Tensor | None  # gradient fed to backward (None: scalar output, backward())

    def grad_bytes(self) -> int:
        """Bytes of the gradient buffers that backward allocates for ``leaves`` (``.grad`` has the leaf's shape)."""
        return sum(t.numel() * t.element_size() for t in self.leaves)


def make_problem(workload: str, shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Problem:
    """Random inputs (fixed seed) for ``workload`` at ``shape``; hidden ~ N(0, 1) and weight std 2/√D, so logits have
    std ~2 (a peaked but non-degenerate softmax, like a trained LM head)."""
    g = torch.Generator(device=device).manual_seed(seed)  # drawn on the device: real GPU sizes are GBs
    n, d, v = shape.tokens, shape.hidden, shape.vocab
    w_std = 2.0 / max(d, 1) ** 0.5

    def randn(*size: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*size, generator=g, device=device) * std).to(dtype)

    if workload == "head":
        hidden = randn(n, d).requires_grad_()
        weight = randn(v, d, std=w_std).requires_grad_()
        labels = torch.randint(0, v, (n,), generator=g, device=device)
        upstream = torch.randn(n, generator=g, device=device)
        return Problem({"hidden": hidden, "weight": weight, "labels": labels}, (hidden, weight), upstream)
    if workload == "logprobs":
        b, t = shape.rows(workload)
        logits = randn(b, t, v, std=2.0).requires_grad_()
        labels = torch.randint(0, v, (b, t), generator=g, device=device)
        labels[:, : t // 4] = -100
        upstream = torch.randn(b, generator=g, device=device)
        return Problem({"logits": logits, "labels": labels}, (logits,), upstream)
    if workload == "dpo":
        b, t = shape.rows(workload)
        hidden = randn(b, t, d).requires_grad_()
        weight = randn(v, d, std=w_std).requires_grad_()
        ref_hidden = (hidden.detach().float() + 0.1 * torch.randn(b, t, d, generator=g, device=device)).to(dtype)
        ref_weight = weight.detach().clone()
        target = torch.randint(0, v, (b, t), generator=g, device=device)
        target[:, : t // 4] = -100
        inputs = {
            "hidden": hidden,
            "weight": weight,
            "target": target,
            "ref_hidden": ref_hidden,
            "ref_weight": ref_weight,
        }
        return Problem(inputs, (hidden, weight), None)
    raise ValueError(f"workload must be one of {WORKLOADS}, got {workload!r}")


# ---------------------------------------------------------------------------------------------------------------------
# naive PyTorch references (what a plain training loop does): fastdpo.reference


def naive_head(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log_softmax(hidden @ weight.T in fp32)[labels]`` -> ``[N]`` fp32, with the ``[N, V]`` logits materialized."""
    return naive_linear_token_logprobs(hidden, weight, labels, validate=False).logprobs


def naive_dpo(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    beta: float = DPO_BETA,
) -> torch.Tensor:
    """Sigmoid DPO loss, rows ``[:B/2]`` chosen and ``[B/2:]`` rejected, logits materialized; scalar fp32."""
    policy = naive_sequence_logprobs((hidden @ weight.T).float(), target)
    with torch.no_grad():
        ref = naive_sequence_logprobs((ref_hidden @ ref_weight.T).float(), target)
    return naive_dpo_loss(policy, ref, beta)


# ---------------------------------------------------------------------------------------------------------------------
# the implementation registry


def _missing(module: str) -> str | None:
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    return None if found else f"unavailable: module {module} is not installed / not written yet"


def _fastdpo_backend(device: torch.device) -> str:
    from fastdpo._dispatch import resolve_backend

    return resolve_backend("auto", device)


@dataclass(frozen=True)
class Impl:
    """One implementation of one workload.

    ``build(problem, device) -> fn`` returns a zero-argument callable running the forward (its output is what
    backward differentiates). ``requires`` lists importable modules; ``cuda_only`` marks GPU-only peers.
    """

    workload: str
    name: str
    build: Callable[[Problem, torch.device], Callable[[], torch.Tensor]]
    requires: tuple[str, ...] = ()
    cuda_only: bool = False
    attr: tuple[str, str] | None = None  # (module, attribute) that must exist, e.g. a not-yet-written function

    def unavailable(self, device: torch.device) -> str | None:
        """``None`` when runnable on ``device``, else ``"unavailable: <reason>"``."""
        if self.cuda_only and device.type != "cuda":
            return f"unavailable: {self.name} needs CUDA (device is {device.type})"
        for module in self.requires:
            reason = _missing(module)
            if reason is not None:
                return reason
        if self.attr is not None:
            module, attribute = self.attr
            try:
                mod = importlib.import_module(module)
                getattr(mod, attribute)
            except Exception as exc:  # a module being written may fail to import: report, don't crash
                return f"unavailable: {module}.{attribute} ({type(exc).__name__}: {exc})"[:200]
        return None

    def label(self, device: torch.device) -> str:
        """Display name; fastdpo shows the backend it dispatches to (``fastdpo[triton]`` / ``fastdpo[torch]``)."""
        if self.name == "fastdpo":
            try:
                return f"fastdpo[{_fastdpo_backend(device)}]"
            except Exception:
                return "fastdpo"
        return self.name


def _head_naive(p: Problem, device: torch.device) -> Callable[[], torch.Tensor]:
    x = p.inputs
    return lambda: naive_head(x["hidden"], x["weight"], x["labels"])


def _head_fastdpo(p: Problem, device: torch.device) -> Callable[[], torch.Tensor]:
    from fastdpo.head.function import linear_token_logprobs

    x = p.inputs
    return lambda: linear_token_logprobs(x["hidden"], x["weight"], x["labels"], validate=False).logprobs


def _head_trl(p: Problem, device: torch.device) -> Callable[[], torch.Tensor]:
    from trl.kernels import ChunkedLogProbFunction

    x = p.inputs

    def run() -> torch.Tensor:
        # forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, outputs)
        return ChunkedLogProbFunction.apply(
            x["hidden"], x["weight"], None, x["labels"], 1.0, TRL_CHUNK_SIZE, None, 1.0, ("log_probs",)
        )[0]

    return run


def _head_torch_lce(p: Problem, device: torch.device) -> Callable[[], torch.Tensor]:
    x = p.inputs
    options = torch.nn.LinearCrossEntropyOptions()
    return lambda: -F.linear_cross_entropy(x["hidden"], x["weight"], x["labels"], reduction="none", options=options)


def _head_cce(p: Problem, device: torch.device) -> Callable[[], torch.Tensor]:
    from cut_cross_entropy import linear_cross_entropy

    x = p.inputs
    return lambda: -linear_cross_entropy(x["hidden"], x["weight"], x["labels"], reduction="none")


def _head_liger(p: Problem, device: torch.device) -> Callable[[], torch.Tensor]:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    # reduction="none": per-token losses (= -log-prob) under any per-token upstream gradient, like the other heads;
    # Liger then recomputes the logits in backward instead of forming their gradient in the forward pass.
    x = p.inputs
    loss = LigerFusedLinearCrossEntropyLoss(reduction="none")
    return lambda: -loss(x["weight"], x["hidden"], x["labels"])


def _lp_naive(p: Problem, device: torch.device) -> Callable[[], torch.Tensor]:
    x = p.inputs
    return lambda: naive_sequence_logprobs(x["logits"].float(), x["labels"])


def _lp_fastdpo(p: Problem, device: torch.device) -> Callable[[], torch.Tensor]:
    from fastdpo.logprobs import sequence_logprobs

    x = p.inputs
    return lambda: sequence_logprobs(x["logits"], x["labels"], validate=False)


def _lp_trl(p: Problem, device: torch.device) -> Callable[[], torch.Tensor]:
    from trl.trainer.utils import selective_log_softmax

    x = p.inputs
    mask = x["labels"] != -100
    index = x["labels"].clamp(min=0)
    return lambda: (selective_log_softmax(x["logits"], index) * mask).sum(-1)


def _dpo_naive(p: Problem, device: torch.device) -> Callable[[], torch.Tensor]:
    x = p.inputs
    return lambda: naive_dpo(x["hidden"], x["weight"], x["target"], x["ref_hidden"], x["ref_weight"])


def _dpo_module(module: torch.nn.Module, p: Problem) -> Callable[[], torch.Tensor]:
    x = p.inputs

    def run() -> torch.Tensor:
        out = module(x["weight"], x["hidden"], x["target"], ref_input=x["ref_hidden"], ref_weight=x["ref_weight"])
        return out[0] if isinstance(out, (tuple, list)) else out

    return run


def _dpo_fastdpo(p: Problem, device: torch.device) -> Callable[[], torch.Tensor]:
    from fastdpo.nn import FusedLinearDPOLoss

    return _dpo_module(FusedLinearDPOLoss(beta=DPO_BETA), p)


def _dpo_liger(p: Problem, device: torch.device) -> Callable[[], torch.Tensor]:
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    # torch.compile needs a C++ toolchain and minutes of compile time on CPU; Liger's eager path is used there.
    return _dpo_module(LigerFusedLinearDPOLoss(beta=DPO_BETA, compiled=device.type == "cuda"), p)


IMPLS: tuple[Impl, ...] = (
    Impl("head", "naive", _head_naive),
    Impl("head", "fastdpo", _head_fastdpo, attr=("fastdpo.head", "linear_token_logprobs")),
    Impl("head", "trl", _head_trl, requires=("trl",), attr=("trl.kernels", "ChunkedLogProbFunction")),
    Impl("head", "torch_lce", _head_torch_lce, attr=("torch.nn", "LinearCrossEntropyOptions")),
    Impl("head", "cce", _head_cce, requires=("cut_cross_entropy",), cuda_only=True),
    Impl(
        "head",
        "liger",
        _head_liger,
        requires=("liger_kernel",),
        cuda_only=True,
        attr=("liger_kernel.transformers", "LigerFusedLinearCrossEntropyLoss"),
    ),
    Impl("logprobs", "naive", _lp_naive),
    Impl("logprobs", "fastdpo", _lp_fastdpo, attr=("fastdpo.logprobs", "sequence_logprobs")),
    Impl("logprobs", "trl", _lp_trl, requires=("trl",), attr=("trl.trainer.utils", "selective_log_softmax")),
    Impl("dpo", "naive", _dpo_naive),
    Impl("dpo", "fastdpo", _dpo_fastdpo, attr=("fastdpo.nn", "FusedLinearDPOLoss")),
    Impl(
        "dpo",
        "liger",
        _dpo_liger,
        requires=("liger_kernel",),
        attr=("liger_kernel.chunked_loss", "LigerFusedLinearDPOLoss"),
    ),
)


def get_impl(workload: str, name: str) -> Impl:
    """The registered implementation ``name`` of ``workload``; ``ValueError`` listing the choices otherwise."""
    for impl in IMPLS:
        if impl.workload == workload and impl.name == name:
            return impl
    choices = sorted({i.name for i in IMPLS if i.workload == workload})
    raise ValueError(f"unknown implementation {name!r} for workload {workload!r}; choices: {choices}")


def impl_names(workload: str) -> list[str]:
    """Names of the implementations registered for ``workload``, naive first."""
    return [i.name for i in IMPLS if i.workload == workload]


def flops(workload: str, shape: Shape) -> dict[str, float]:
    """Useful FLOPs of fwd / bwd / step (no recompute counted): head and dpo GEMMs 2·N·D·V each (dpo: policy forward
    + its two gradient GEMMs + the reference forward); logprobs ~5 flops per logit forward and backward."""
    n, d, v = shape.tokens, shape.hidden, shape.vocab
    if workload == "head":
        fwd, bwd = 2.0 * n * d * v, 4.0 * n * d * v
    elif workload == "dpo":
        fwd, bwd = 4.0 * n * d * v, 4.0 * n * d * v
    else:
        fwd, bwd = 5.0 * n * v, 5.0 * n * v
    return {"fwd": fwd, "bwd": bwd, "step": fwd + bwd}


def min_bytes(workload: str, shape: Shape, elem: int) -> dict[str, float]:
    """Minimum HBM traffic of fwd / bwd / step for the memory-bound ``logprobs`` workload: the logits read once in
    forward, read again and their gradient written in backward (``elem`` bytes per element); GEMM workloads: the
    operands and gradients once."""
    n, d, v = shape.tokens, shape.hidden, shape.vocab
    if workload == "logprobs":
        fwd, bwd = float(n * v * elem), 2.0 * n * v * elem
    else:
        fwd = float((n * d + v * d) * elem)
        bwd = 2.0 * (n * d + v * d) * elem
    return {"fwd": fwd, "bwd": bwd, "step": fwd + bwd}
