"""Run-to-run determinism: the same inputs give bit-identical outputs, losses and gradients, every time.

fastdpo promises no atomics on results (fixed tile order, segment sums by sorted runs). Each case below runs the same
computation several times from fresh tensor copies and compares with ``torch.equal`` (bitwise, NaN-free inputs).

What the CPU cases guard, and what they cannot see. They run on one intra-op thread, and the Triton interpreter
executes a grid's programs one after another, so a scheduling-order nondeterminism (atomics racing, split-K
reductions finishing in varying order) cannot show up here. They do catch everything that makes a *call* depend on
more than its inputs: state carried between calls (reused scratch / kept-logits buffers, the engine's per-step kwargs
cache), reads of uninitialized memory (``torch.empty`` tiles read before written), RNG use, and Python-level
ordering (set / dict iteration over segments or groups) -- on the kernels through the interpreter, the torch path
(padded and packed layouts), the fused head (both backends, sequence and token outputs with statistics, multi-tile
shapes), ``preference_loss``, ``nn.FusedLinearDPOLoss`` (with and without grad-in-forward) and a full
``DPOEngine.step`` + backward on a tiny HF model (plain and grad-in-forward).

The scheduling-order half of the promise is checked by the ``gpu`` cases at the end (``pytest -m gpu``): the compiled
kernels on CUDA with many programs in flight, at shapes with many vocabulary tiles and unsorted segments.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from backends import BACKENDS
from helpers import STAT_FLAGS, packed_logits_case, perturbed_reference

pytestmark = pytest.mark.usefixtures("one_thread")  # determinism at a fixed thread count, fast on tiny ops

RUNS = 3  # torch path; the Triton interpreter is slow, so its cases repeat twice (enough to catch run-to-run drift)


def _assert_bitwise_repeatable(run: Callable[[], dict[str, torch.Tensor]], runs: int = RUNS) -> dict[str, torch.Tensor]:
    """Call ``run`` ``runs`` times; every returned tensor must be bit-identical to the first run's."""
    first = run()
    for name, t in first.items():
        assert torch.isfinite(t.float()).all(), f"{name} is not finite: the comparison would be vacuous"
    for i in range(1, runs):
        again = run()
        assert again.keys() == first.keys()
        for name, t in first.items():
            u = again[name]
            assert t.dtype == u.dtype and t.shape == u.shape, name
            if not torch.equal(t, u):
                diff = float((t.double() - u.double()).abs().max())
                raise AssertionError(f"run {i}: {name} differs from run 0 (max abs diff {diff:.3e})")
    return first


def _step_outputs(engine: Any, policy: torch.nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """One engine step + backward from zeroed gradients: the loss, every metric and every parameter gradient."""
    policy.zero_grad(set_to_none=True)
    loss, metrics = engine.step(batch)
    loss.backward()
    out = {"loss": loss.detach(), **{k: torch.as_tensor(v).detach().float() for k, v in metrics.items()}}
    out.update({f"grad/{n}": p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None})
    return out


def _grads(out: torch.Tensor, leaves: dict[str, torch.Tensor], seed: int = 7) -> dict[str, torch.Tensor]:
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    grads = torch.autograd.grad(out, list(leaves.values()), g)
    return {f"grad_{k}": v for k, v in zip(leaves, grads)}


def _loss_outputs(
    loss: torch.Tensor, leaves: dict[str, torch.Tensor], extras: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """A run's outputs: the loss, its gradient wrt each leaf (``grad_<name>``) and ``extras``."""
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return {"loss": loss.detach(), **{f"grad_{k}": g for k, g in zip(leaves, grads)}, **extras}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sequence_logprobs_deterministic(backend: str, dtype: torch.dtype) -> None:
    from fastdpo import sequence_logprobs

    g = torch.Generator().manual_seed(0)
    base = (torch.randn(3, 5, 700, generator=g) * 4).to(dtype)  # V spans several Triton blocks / torch chunks
    labels = torch.randint(0, 700, (3, 5), generator=g)
    labels[1, :4] = -100

    def run() -> dict[str, torch.Tensor]:
        x = base.clone().requires_grad_(True)
        out = (
            sequence_logprobs(x, labels, backend=backend, chunk_rows=5)
            if backend == "torch"
            else sequence_logprobs(x, labels, backend=backend, block_v=256)
        )
        return {"out": out.detach(), **_grads(out, {"logits": x})}

    _assert_bitwise_repeatable(run, RUNS if backend == "torch" else 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_sequence_logprobs_deterministic(backend: str) -> None:
    from fastdpo import sequence_logprobs

    s = 13
    # unsorted segments: a reduction order that atomics would scramble
    base, labels, seg, _ = packed_logits_case(1, n=61, v=157, num_ids=s, scale=3.0, ignore_every=7)

    def run() -> dict[str, torch.Tensor]:
        x = base.clone().requires_grad_(True)
        out = sequence_logprobs(x, labels, segment_ids=seg, num_segments=s, backend=backend)
        return {"out": out.detach(), **_grads(out, {"logits": x})}

    _assert_bitwise_repeatable(run, RUNS if backend == "torch" else 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_head_deterministic(backend: str) -> None:
    from fastdpo import linear_sequence_logprobs, linear_token_logprobs

    g = torch.Generator().manual_seed(2)
    n, d, v = (150, 24, 333) if backend == "torch" else (40, 16, 150)
    tiles = (32, 64) if backend == "torch" else (16, 64)
    h0 = torch.randn(n, d, generator=g)
    w0 = torch.randn(v, d, generator=g) * 0.3
    b0 = torch.randn(v, generator=g) * 0.1
    labels = torch.randint(0, v, (n,), generator=g)
    labels[5:12] = -100
    seg = torch.randint(0, 11, (n,), generator=g)

    def run() -> dict[str, torch.Tensor]:
        h, w, b = (t.clone().requires_grad_(True) for t in (h0, w0, b0))
        # small tiles: many token x vocab tiles, so the fp32 weight-gradient accumulation order matters
        seq = linear_sequence_logprobs(
            h,
            w,
            labels,
            bias=b,
            segment_ids=seg,
            num_segments=11,
            softcap=20.0,
            token_tile=tiles[0],
            vocab_tile=tiles[1],
            backend=backend,
        )
        stats = linear_token_logprobs(
            h, w, labels, bias=b, **STAT_FLAGS, token_tile=tiles[0], vocab_tile=tiles[1], backend=backend
        )
        total = seq.sum() * 0.5 + (stats.logprobs * torch.linspace(-1, 1, n)).sum()
        grads = torch.autograd.grad(total, [h, w, b])
        return {
            "seq": seq.detach(),
            "tok": stats.logprobs.detach(),
            "entropy": stats.entropy,
            "log_sum_p2": stats.log_sum_p2,
            "mean_logit": stats.mean_logit,
            "argmax_hit": stats.argmax_hit.float(),
            "grad_hidden": grads[0],
            "grad_weight": grads[1],
            "grad_bias": grads[2],
        }

    _assert_bitwise_repeatable(run, RUNS if backend == "torch" else 2)


def test_preference_loss_deterministic() -> None:
    from fastdpo import preference_loss

    g = torch.Generator().manual_seed(3)
    inputs = [-(torch.rand(37, generator=g) * 30 + 1) for _ in range(4)]
    lengths = torch.randint(1, 50, (2, 37), generator=g)

    def run() -> dict[str, torch.Tensor]:
        pc, pr = (t.clone().requires_grad_(True) for t in inputs[:2])
        loss, metrics = preference_loss(
            pc,
            pr,
            inputs[2],
            inputs[3],
            loss_type=["sigmoid", "ipo", "aot"],
            loss_weights=[1.0, 0.5, 0.25],
            beta=0.2,
            chosen_lengths=lengths[0],
            rejected_lengths=lengths[1],
        )
        return _loss_outputs(loss, {"c": pc, "r": pr}, {k: torch.as_tensor(v).float() for k, v in metrics.items()})

    _assert_bitwise_repeatable(run)


@pytest.mark.parametrize("grad_in_forward", [False, True])
def test_fused_linear_dpo_loss_deterministic(grad_in_forward: bool) -> None:
    from fastdpo.nn import FusedLinearDPOLoss

    g = torch.Generator().manual_seed(4)
    b, t, d, v = 3, 11, 16, 203
    x0 = torch.randn(2 * b, t, d, generator=g)
    w0 = torch.randn(v, d, generator=g) * 0.4
    ref_x = x0 + 0.1 * torch.randn(2 * b, t, d, generator=g)
    target = torch.randint(0, v, (2 * b, t), generator=g)
    target[:, :3] = -100
    loss_fn = FusedLinearDPOLoss(beta=0.1, compute_nll_loss=True, grad_in_forward=grad_in_forward)

    def run() -> dict[str, torch.Tensor]:
        x, w = x0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        loss, aux = loss_fn(w, x, target, ref_input=ref_x, ref_weight=w0)
        return _loss_outputs(
            loss, {"input": x, "weight": w}, {f"aux{i}": a.detach().float() for i, a in enumerate(aux)}
        )

    _assert_bitwise_repeatable(run)


@pytest.mark.parametrize("grad_in_forward", [False, True])
def test_engine_step_deterministic(grad_in_forward: bool) -> None:
    from fastdpo import DPOEngine, PreferenceCollator, tiny

    tok = tiny.make_tokenizer()
    policy = tiny.make_model("llama", tok, attn_implementation="eager", seed=0).train()
    ref = perturbed_reference(policy, seed=1)
    batch = PreferenceCollator(tok, packing="padding_free")(tiny.preference_rows(4, seed=5))
    engine = DPOEngine(policy, ref, loss_type="sigmoid", beta=0.1, grad_in_forward=grad_in_forward)
    # (the engine runs the torch path on CPU; the Triton kernels' determinism is covered by the cases above)

    first = _assert_bitwise_repeatable(lambda: _step_outputs(engine, policy, batch))
    assert any(k.startswith("grad/") for k in first), "the engine step produced no gradients"
    policy.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------------------------
# GPU: compiled kernels, programs scheduled concurrently (run by `pytest -m gpu`)
# ---------------------------------------------------------------------------------------------------------------


def _kernel_cases(device: torch.device, runs: int, scale: int = 1) -> None:
    """The log-prob kernel, the fused head (recompute and grad-in-forward) and segment sums on ``device`` with
    ``backend="triton"``: many rows / vocabulary tiles / unsorted segments, bitwise over ``runs`` runs."""
    from fastdpo import linear_sequence_logprobs, linear_token_logprobs, sequence_logprobs
    from fastdpo.nn import FusedLinearDPOLoss
    from fastdpo.segments import segment_sum

    g = torch.Generator().manual_seed(11)
    n, v, d, s = 96 * scale, 1000 * scale + 7, 64, 23
    logits0 = (torch.randn(n, v, generator=g) * 4).to(device, torch.bfloat16)
    labels = torch.randint(0, v, (n,), generator=g).to(device)
    labels[::9] = -100
    seg = torch.randint(0, s, (n,), generator=g).to(device)  # unsorted: a reduction order atomics would scramble
    h0 = torch.randn(n, d, generator=g).to(device)
    w0 = (torch.randn(v, d, generator=g) * 0.3).to(device)
    upstream = torch.randn(n, generator=g).to(device)

    def logprob_kernel() -> dict[str, torch.Tensor]:
        x = logits0.clone().requires_grad_(True)
        out = sequence_logprobs(x, labels, segment_ids=seg, num_segments=s, backend="triton")
        (grad,) = torch.autograd.grad(out, [x], torch.linspace(-1, 1, s, device=device))
        return {"out": out.detach(), "grad": grad}

    def fused_head() -> dict[str, torch.Tensor]:
        h, w = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        seq = linear_sequence_logprobs(h, w, labels, segment_ids=seg, num_segments=s, softcap=30.0, backend="triton")
        stats = linear_token_logprobs(h, w, labels, return_entropy=True, return_argmax_hit=True, backend="triton")
        total = seq.sum() + (stats.logprobs * upstream).sum()
        gh, gw = torch.autograd.grad(total, [h, w])
        return {
            "seq": seq.detach(),
            "tok": stats.logprobs.detach(),
            "entropy": stats.entropy,
            "argmax_hit": stats.argmax_hit.float(),
            "grad_hidden": gh,
            "grad_weight": gw,
        }

    def grad_in_forward() -> dict[str, torch.Tensor]:
        x, w = h0.clone().view(2 * 4, n // 8, d).requires_grad_(True), w0.clone().requires_grad_(True)
        target = labels.view(2 * 4, n // 8)
        loss, _ = FusedLinearDPOLoss(beta=0.1, grad_in_forward=True, backend="triton")(
            w, x, target, ref_input=x.detach() * 0.9, ref_weight=w0
        )
        gx, gw = torch.autograd.grad(loss, [x, w])
        return {"loss": loss.detach(), "grad_input": gx, "grad_weight": gw}

    def segment_sums() -> dict[str, torch.Tensor]:
        vals = upstream.repeat(50 * scale)
        ids = seg.repeat(50 * scale)
        return {"sum": segment_sum(vals, ids, s, backend="triton")}

    for case in (logprob_kernel, fused_head, grad_in_forward, segment_sums):
        _assert_bitwise_repeatable(case, runs)


@pytest.mark.gpu
def test_compiled_kernels_deterministic_cuda() -> None:
    _kernel_cases(torch.device("cuda"), runs=5, scale=40)


@pytest.mark.gpu
@pytest.mark.parametrize("grad_in_forward", [False, True])
def test_engine_step_deterministic_cuda(grad_in_forward: bool) -> None:
    """The full engine step on CUDA (Triton head, bf16 model, padding-free batch) is bitwise repeatable. The model's
    own ops are held to their deterministic CUDA implementations (eager attention, ``use_deterministic_algorithms``
    in warn-only mode: SDPA's memory-efficient backward and plain ``index_add`` use atomics), so a difference points
    at fastdpo."""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        _engine_step_cuda(grad_in_forward)
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def _engine_step_cuda(grad_in_forward: bool) -> None:
    from fastdpo import DPOEngine, PreferenceCollator, tiny

    tok = tiny.make_tokenizer()
    policy = tiny.make_model("llama", tok, attn_implementation="eager", seed=0).to("cuda", torch.bfloat16).train()
    ref = tiny.make_model("llama", tok, attn_implementation="eager", seed=1).to("cuda", torch.bfloat16)
    batch = {
        k: v.cuda() if isinstance(v, torch.Tensor) else v
        for k, v in PreferenceCollator(tok, packing="padding_free")(tiny.preference_rows(8, seed=5)).items()
    }
    engine = DPOEngine(policy, ref, grad_in_forward=grad_in_forward, backend="triton")

    _assert_bitwise_repeatable(lambda: _step_outputs(engine, policy, batch), 4)
