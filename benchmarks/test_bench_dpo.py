"""pytest-benchmark suite: the sigmoid DPO loss from a fused linear head (policy and frozen reference hidden states,
forward + backward): ``fastdpo.nn.FusedLinearDPOLoss`` against naive PyTorch and Liger-Kernel's
``LigerFusedLinearDPOLoss``, on small CPU shapes. Run with ``pytest benchmarks/``.

Each case also checks the loss and the hidden / weight gradients against a float64 recomputation (the sigmoid DPO
formula of LOSSES.md written out), within the naive same-dtype error (``conftest.py``).
"""

from __future__ import annotations

import pytest
import torch

from fastdpo.benchmarks import impls
from fastdpo.benchmarks.impls import DPO_BETA, Shape
from fastdpo.reference import naive_dpo_loss, naive_sequence_logprobs

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPE = Shape(512, 64, 2053) if DEVICE.type == "cpu" else Shape(8192, 2048, 128256)
DTYPE = torch.float32 if DEVICE.type == "cpu" else torch.bfloat16


def _plain(problem: impls.Problem, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``-mean logsigmoid(beta * ((pc - rc) - (pr - rr)))`` with every sequence log-prob a masked sum of
    ``log_softmax(hidden @ weight.T)`` in ``dtype`` (float64: the oracle): ``(loss, hidden grad, weight grad)``."""
    x = problem.inputs
    target = x["target"]
    h = x["hidden"].detach().to(dtype).requires_grad_(True)
    w = x["weight"].detach().to(dtype).requires_grad_(True)

    policy = naive_sequence_logprobs(h @ w.T, target)
    with torch.no_grad():
        ref = naive_sequence_logprobs(x["ref_hidden"].to(dtype) @ x["ref_weight"].to(dtype).T, target)
    loss = naive_dpo_loss(policy, ref, DPO_BETA)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("name", impls.impl_names("dpo"))
def test_bench_dpo_loss_fwd_bwd(benchmark, bench_case, check_within_naive, name):
    shape = SHAPE.normalized("dpo")
    impl, problem, loss = bench_case("dpo", name, shape, DTYPE, DEVICE, seed=9)
    hidden, weight = problem.leaves
    naive, ref = _plain(problem, DTYPE), _plain(problem, torch.float64)
    for label, got, n, r in zip(("loss", "hidden.grad", "weight.grad"), (loss, hidden.grad, weight.grad), naive, ref):
        check_within_naive(f"{name} {label}", got, n, r)
    benchmark.extra_info.update(tokens=shape.tokens, hidden=shape.hidden, vocab=shape.vocab, impl=impl.label(DEVICE))
