"""Independent oracles: every public op against float64 math written out in this file, with plain autograd.

The other test files compare against library code (``naive_sequence_logprobs``, ``linear_sequence_logprobs`` as the
grad-in-forward oracle, ...), which shares the library's transform order and conventions: a wrong convention would be
checked against itself. Here the oracle is only ``torch.log_softmax`` / ``torch.logsigmoid`` of explicitly built
float64 logits (``z = softcap * tanh(((h @ W.T + b) * scale) / softcap) / temperature``: ``helpers.explicit_logits``,
test code), Python-loop segment sums and the LOSSES.md formulas typed in again -- nothing imported from fastdpo but the
op under test (and the list of loss types it runs over, which ``test_trl.py`` checks against TRL's).

Rule (the suite's): ``max|got - f64| <= max|naive - f64| + tol``, the naive path being the same formula evaluated in the
inputs' dtype (``tol = 2e-6 * max|f64|``, plus one rounding -- ``eps / 2`` of the dtype -- for half-precision
outputs, plus one more for bf16 through the Triton *interpreter*, which truncates fp32 -> bf16 stores where GPUs
round). Float64 inputs (the loss formulas) are compared at 1e-12.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from backends import BACKENDS
from helpers import STAT_FLAGS, explicit_logits, packed_logits_case, ref_scores

from fastdpo.losses import LOSS_TYPES

pytestmark = pytest.mark.usefixtures("one_thread")

IGNORE = -100


def _tol_u(dtype: torch.dtype, backend: str) -> float:
    """Unit roundoffs allowed over the naive error for an output of ``dtype`` (see the module docstring)."""
    if dtype not in (torch.bfloat16, torch.float16):
        return 0.0
    u = torch.finfo(dtype).eps / 2
    return 2 * u if backend == "triton" and dtype == torch.bfloat16 else u


def check(name: str, got: torch.Tensor, naive: torch.Tensor, ref: torch.Tensor, u: float = 0.0) -> None:
    ref = ref.detach().double()
    assert got.shape == ref.shape, (name, tuple(got.shape), tuple(ref.shape))
    scale = max(float(ref.abs().max()), 1e-30) if ref.numel() else 1.0
    err = float((got.detach().double() - ref).abs().max()) if ref.numel() else 0.0
    naive_err = float((naive.detach().double() - ref).abs().max()) if ref.numel() else 0.0
    assert err <= naive_err + (2e-6 + u) * scale, (
        f"{name}: error {err:.3e} > naive {naive_err:.3e} (+tol, scale {scale:.3e})"
    )


def token_logps_of(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log_softmax(z)[label]`` per token (in ``z``'s dtype), exactly 0 where ``labels == IGNORE``."""
    lp = torch.log_softmax(z, dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(labels == IGNORE, torch.zeros_like(lp), lp)


def loop_segment_sum(values: torch.Tensor, ids: torch.Tensor, num: int) -> torch.Tensor:
    """``out[s] = sum of values[i] with ids[i] == s``, one Python loop (differentiable, float64 / fp32 accumulate)."""
    acc = torch.float64 if values.dtype == torch.float64 else torch.float32
    return torch.stack([values[ids == s].to(acc).sum() for s in range(num)])


def _grads(out: torch.Tensor, leaves: list[torch.Tensor], upstream: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out, leaves, upstream.to(out.dtype), retain_graph=True))


# ---------------------------------------------------------------------------------------------------------------
# log-probs from logits
# ---------------------------------------------------------------------------------------------------------------


def _logits_case(dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(3, 5, 301, generator=g) * 3 - 2).to(dtype)  # V = 301: not a multiple of any block
    labels = torch.randint(0, 301, (3, 5), generator=g)
    labels[0] = IGNORE  # a row with no scored token
    labels[1, 1:3] = IGNORE
    return logits, labels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sequence_and_token_logprobs(backend: str, dtype: torch.dtype) -> None:
    from fastdpo import sequence_logprobs, token_logprobs

    logits, labels = _logits_case(dtype, seed=1)
    up_seq = torch.randn(3, generator=torch.Generator().manual_seed(2))
    up_tok = torch.randn(3, 5, generator=torch.Generator().manual_seed(3))
    results = {}
    for kind, x in (("f64", logits.double()), ("naive", logits.clone()), ("op", logits.clone())):
        x.requires_grad_(True)
        if kind == "op":
            seq = sequence_logprobs(x, labels, backend=backend)
            avg = sequence_logprobs(x, labels, average=True, backend=backend)
            tok = token_logprobs(x, labels, backend=backend)
        else:
            t = token_logps_of(x, labels)
            acc = torch.float64 if kind == "f64" else torch.float32
            seq = t.to(acc).sum(-1)
            avg = seq / (labels != IGNORE).sum(-1).clamp(min=1)
            tok = t.to(acc)
        (g_seq,) = _grads(seq, [x], up_seq)
        (g_tok,) = _grads(tok, [x], up_tok)
        results[kind] = (seq, avg, tok, g_seq, g_tok)
    u = _tol_u(dtype, backend)
    for i, name in enumerate(("sequence", "average", "token", "grad(sequence)", "grad(token)")):
        check(name, results["op"][i], results["naive"][i], results["f64"][i], u if i >= 3 else 0.0)
    assert results["op"][0][0] == 0 and not results["op"][3][0].any()  # the empty row: 0, zero gradient


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_logprobs_packed_segments(backend: str) -> None:
    from fastdpo import sequence_logprobs

    s = 9
    # unsorted ids; segment s - 1 stays empty
    logits, labels, ids, g = packed_logits_case(4, n=41, v=157, num_ids=s - 1, scale=2.0, ignore_every=6)
    up = torch.randn(s, generator=g)
    res = {}
    for kind, x in (("f64", logits.double()), ("naive", logits.clone()), ("op", logits.clone())):
        x.requires_grad_(True)
        out = (
            sequence_logprobs(x, labels, segment_ids=ids, num_segments=s, backend=backend)
            if kind == "op"
            else loop_segment_sum(token_logps_of(x, labels), ids, s)
        )
        res[kind] = (out, *_grads(out, [x], up))
    check("packed", res["op"][0], res["naive"][0], res["f64"][0])
    check("packed grad", res["op"][1], res["naive"][1], res["f64"][1])
    assert res["op"][0][s - 1] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_segment_sum(backend: str) -> None:
    from fastdpo.segments import segment_sum

    g = torch.Generator().manual_seed(5)
    values = (torch.randn(1000, generator=g) * 10).requires_grad_(True)
    ids = torch.randint(0, 13, (1000,), generator=g)
    ids[ids == 7] = 8  # an empty segment in the middle
    out = segment_sum(values, ids, 14, backend=backend)
    ref = loop_segment_sum(values.detach().double(), ids, 14)
    naive = loop_segment_sum(values.detach(), ids, 14)
    check("segment_sum", out, naive, ref)
    assert out[7] == 0 and out[13] == 0
    up = torch.randn(14, generator=g)
    (grad,) = torch.autograd.grad(out, [values], up)
    assert torch.equal(grad, up[ids])  # d out[s] / d values[i] = 1 exactly where ids[i] == s


# ---------------------------------------------------------------------------------------------------------------
# fused LM head
# ---------------------------------------------------------------------------------------------------------------

TRANSFORMS = {
    "plain": {},
    "bias+scale+temperature": {"bias": True, "logit_scale": 0.75, "temperature": 1.3},
    "softcap (Gemma 2)": {"bias": True, "softcap": 5.0, "logit_scale": 1.5, "temperature": 0.8},
}


def _head_case(dtype: torch.dtype, seed: int, n: int = 23, d: int = 16, v: int = 301) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, d, generator=g) * 1.5).to(dtype)
    weight = (torch.randn(v, d, generator=g) * 0.5).to(dtype)
    bias = (torch.randn(v, generator=g) * 0.3).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[3:6] = IGNORE
    labels[7] = int(torch.argmax(explicit_logits(hidden[7:8].double(), weight.double())))  # one argmax hit at least
    return hidden, weight, bias, labels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_linear_token_logprobs(backend: str, dtype: torch.dtype, transform: str) -> None:
    from fastdpo import linear_token_logprobs

    opts = dict(TRANSFORMS[transform])
    use_bias = opts.pop("bias", False)
    hidden0, weight0, bias0, labels = _head_case(dtype, seed=6)
    up = torch.randn(labels.shape, generator=torch.Generator().manual_seed(7))
    res: dict[str, Any] = {}
    for kind, cast in (("f64", torch.float64), ("naive", dtype), ("op", dtype)):
        h, w, b = (t.to(cast).clone().requires_grad_(True) for t in (hidden0, weight0, bias0))
        leaves = [h, w, b] if use_bias else [h, w]
        if kind == "op":
            stats = linear_token_logprobs(
                h, w, labels, bias=b if use_bias else None, **opts, **STAT_FLAGS, backend=backend
            )
            out = stats.logprobs
            extra = (stats.entropy, stats.log_sum_p2, stats.mean_logit, stats.argmax_hit)
        else:
            z = explicit_logits(h, w, b if use_bias else None, **opts)
            out = token_logps_of(z, labels).to(torch.float64 if kind == "f64" else torch.float32)
            logp = torch.log_softmax(z.detach().double() if kind == "f64" else z.detach().float(), dim=-1)
            p, valid = logp.exp(), labels != IGNORE
            extra = tuple(
                torch.where(valid, t, torch.zeros_like(t))
                for t in (-(p * logp).sum(-1), torch.logsumexp(2 * logp, dim=-1), z.detach().to(logp.dtype).mean(-1))
            )
            extra = (*extra, valid & (z.detach().argmax(-1) == labels))
        res[kind] = (out, *_grads(out, leaves, up), extra)
    u = _tol_u(dtype, backend)
    check("log-probs", res["op"][0], res["naive"][0], res["f64"][0])
    for i, leaf in enumerate(("hidden", "weight", "bias")[: len(res["op"]) - 2], start=1):
        check(f"grad {leaf}", res["op"][i], res["naive"][i], res["f64"][i], u)
    (ent, lsp2, mean_z, hit), (n_ent, n_lsp2, n_mean, _), (r_ent, r_lsp2, r_mean, r_hit) = (
        res["op"][-1],
        res["naive"][-1],
        res["f64"][-1],
    )
    check("entropy", ent, n_ent, r_ent)
    check("log sum p^2", lsp2, n_lsp2, r_lsp2)
    check("mean logit", mean_z, n_mean, r_mean)
    # top-1: identical wherever the float64 winner leads the runner-up by more than the naive logit error
    z64 = explicit_logits(hidden0.double(), weight0.double(), bias0.double() if use_bias else None, **opts)
    top2 = z64.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-2
    assert hit.dtype == torch.bool and torch.equal(hit[clear], r_hit[clear]) and bool(r_hit[7])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("average", [False, True])
def test_linear_sequence_logprobs(backend: str, average: bool) -> None:
    from fastdpo import linear_sequence_logprobs

    g = torch.Generator().manual_seed(8)
    hidden0, weight0, bias0, _ = _head_case(torch.float32, seed=9, n=4 * 7)
    labels = torch.randint(0, weight0.shape[0], (4, 7), generator=g)
    labels[2] = IGNORE  # an empty sequence
    labels[0, :3] = IGNORE
    up = torch.randn(4, generator=g)
    res = {}
    for kind, cast in (("f64", torch.float64), ("naive", torch.float32), ("op", torch.float32)):
        h, w, b = (t.to(cast).clone().requires_grad_(True) for t in (hidden0.view(4, 7, -1), weight0, bias0))
        if kind == "op":
            out = linear_sequence_logprobs(h, w, labels, bias=b, softcap=8.0, average=average, backend=backend)
        else:
            tok = token_logps_of(explicit_logits(h, w, b, softcap=8.0), labels)
            out = tok.sum(-1)
            if average:
                out = out / (labels != IGNORE).sum(-1).clamp(min=1)
        res[kind] = (out, *_grads(out, [h, w, b], up))
    for i, name in enumerate(("sequence", "grad hidden", "grad weight", "grad bias")):
        check(name, res["op"][i], res["naive"][i], res["f64"][i])
    assert res["op"][0][2] == 0 and not res["op"][1][2].any()


def _pair_dpo(beta: float, ref_c: torch.Tensor, ref_r: torch.Tensor, num_pairs: int):
    """``loss_fn(seq_logps, ids)`` of one pair ``ids = [i, P + i]``: its share of the batch-mean sigmoid DPO loss."""

    def loss_fn(seq: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        i = int(ids[0])
        margin = (seq[0] - ref_c[i]) - (seq[1] - ref_r[i])
        return -F.logsigmoid(beta * margin) / num_pairs

    return loss_fn


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("token_weights", [False, True], ids=["sums", "ld_weights"])
def test_linear_logprobs_loss_grad_in_forward(backend: str, token_weights: bool) -> None:
    """Loss, sequence log-probs and the hidden / weight / bias gradients formed in the forward pass, against plain
    autograd through explicit float64 logits of the same loss (not against the library's own head)."""
    from fastdpo.head.grad_in_forward import linear_logprobs_loss_grad_in_forward

    P, beta = 3, 0.7
    g = torch.Generator().manual_seed(10)
    hidden0, weight0, bias0, labels = _head_case(torch.float32, seed=11, n=40)
    seg = torch.randint(0, 2 * P, (40,), generator=g)
    ref = -torch.rand(2 * P, generator=g, dtype=torch.float64) * 30
    weights = torch.where(torch.rand(40, generator=g) < 0.5, 1.0, 0.4) if token_weights else None
    groups = [torch.tensor([i, P + i]) for i in range(P)]
    res = {}
    for kind, cast in (("f64", torch.float64), ("naive", torch.float32), ("op", torch.float32)):
        h, w, b = (t.to(cast).clone().requires_grad_(True) for t in (hidden0, weight0, bias0))
        ref_c, ref_r = ref[:P].to(cast), ref[P:].to(cast)
        if kind == "op":
            loss, seq = linear_logprobs_loss_grad_in_forward(
                h,
                w,
                labels,
                seg,
                2 * P,
                _pair_dpo(beta, ref_c, ref_r, P),
                bias=b,
                softcap=6.0,
                temperature=1.2,
                groups=groups,
                token_weights=weights,
                backend=backend,
            )
        else:
            tok = token_logps_of(explicit_logits(h, w, b, softcap=6.0, temperature=1.2), labels)
            seq = loop_segment_sum(tok * (weights.to(cast) if weights is not None else 1.0), seg, 2 * P)
            loss = -F.logsigmoid(beta * ((seq[:P] - ref_c) - (seq[P:] - ref_r))).mean()
        loss.backward()
        res[kind] = (loss, seq, h.grad, w.grad, b.grad)
    for i, name in enumerate(("loss", "sequence log-probs", "grad hidden", "grad weight", "grad bias")):
        check(name, res["op"][i], res["naive"][i], res["f64"][i])


# ---------------------------------------------------------------------------------------------------------------
# preference_loss: LOSSES.md, typed in again
# ---------------------------------------------------------------------------------------------------------------


def losses_md(
    kind: str,
    pc,
    pr,
    rc,
    rr,
    len_c,
    len_r,
    *,
    beta: float,
    eps: float,
    tau: float = 0.05,
    f_div: str = "reverse_kl",
    alpha: float = 0.5,
) -> torch.Tensor:
    """Per-pair loss of LOSSES.md (``sft``: the batch scalar), float64."""
    c, r = pc - rc, pr - rr
    sc, sr = ref_scores(c, f_div, alpha), ref_scores(r, f_div, alpha)
    d = sc - sr
    lc, lr = len_c.double().clamp(min=1), len_r.double().clamp(min=1)
    ls = F.logsigmoid
    sig = torch.sigmoid
    if kind == "sigmoid":
        return -ls(beta * d)
    if kind == "hinge":
        return torch.relu(1 - beta * d)
    if kind == "ipo":
        return (sc / lc - sr / lr - 1 / (2 * beta)) ** 2
    if kind == "exo_pair":
        return sig(beta * d) * (ls(beta * d) - math.log(1 - eps)) + sig(-beta * d) * (ls(-beta * d) - math.log(eps))
    if kind == "nca_pair":
        return -ls(beta * c) - 0.5 * ls(-beta * c) - 0.5 * ls(-beta * r)
    if kind == "robust":
        return (-(1 - eps) * ls(beta * d) + eps * ls(-beta * d)) / (1 - 2 * eps)
    if kind == "bco_pair":
        return -ls(beta * c) - ls(-beta * r)
    if kind == "sppo_hard":
        return (c - 1 / (2 * beta)) ** 2 + (r + 1 / (2 * beta)) ** 2
    if kind in ("aot", "aot_unpaired"):
        a, b = (pc - pr, rc - rr) if kind == "aot" else (c, r)
        delta = torch.sort(a).values - torch.sort(b).values
        return -(1 - eps) * ls(beta * delta) - eps * ls(-beta * delta)
    if kind == "apo_zero":
        return 1 - sig(beta * c) + sig(beta * r)
    if kind == "apo_down":
        return sig(beta * c) + 1 - sig(beta * (c - r))
    if kind == "discopop":
        z = beta * d
        m = sig(z / tau)
        return (1 - m) * (-ls(z)) + m * torch.exp(-z)
    if kind == "sft":
        return (-pc).sum() / len_c.double().sum().clamp(min=1)
    if kind == "sigmoid_norm":
        return -ls(beta * (sc / lc - sr / lr))
    raise AssertionError(kind)


EPS = {"exo_pair": 1e-3, "robust": 0.1, "aot": 0.1, "aot_unpaired": 0.1}


def _pl_inputs(seed: int, p: int = 7) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr = (-(torch.rand(p, generator=g, dtype=torch.float64) * 40 + 1) for _ in range(4))
    lens = torch.randint(0, 30, (2, p), generator=g)
    lens[0, 2] = 0  # an empty completion: clamped at 1
    return pc, pr, rc, rr, lens[0], lens[1]


@pytest.mark.parametrize("kind", LOSS_TYPES)
def test_preference_loss_matches_losses_md(kind: str) -> None:
    from fastdpo import preference_loss

    pc, pr, rc, rr, len_c, len_r = _pl_inputs(seed=LOSS_TYPES.index(kind))
    beta, eps = 0.3, EPS.get(kind, 0.0)
    a, b = pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)
    loss, metrics = preference_loss(
        a, b, rc, rr, loss_type=kind, beta=beta, label_smoothing=eps, chosen_lengths=len_c, rejected_lengths=len_r
    )
    a2, b2 = pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)
    ref = losses_md(kind, a2, b2, rc, rr, len_c, len_r, beta=beta, eps=eps).mean()
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    ga, gb = torch.autograd.grad(loss, [a, b], allow_unused=True)
    ra, rb = torch.autograd.grad(ref, [a2, b2], allow_unused=True)
    for got, want in ((ga, ra), (gb, rb)):
        if want is None:  # the formula does not depend on it (sft: rejected)
            assert got is None or not got.any()
        else:
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    c, r = pc - rc, pr - rr  # TRL's metrics
    want_metrics = {
        "rewards/chosen": beta * c.mean(),
        "rewards/rejected": beta * r.mean(),
        "rewards/accuracies": (beta * c > beta * r).double().mean(),
        "rewards/margins": (beta * (c - r)).mean(),
        "logps/chosen": pc.mean(),
        "logps/rejected": pr.mean(),
    }
    for key, value in want_metrics.items():
        assert float(metrics[key]) == pytest.approx(float(value), rel=1e-12, abs=1e-12), key


@pytest.mark.parametrize(
    "f_div,kind",
    [
        (f, k)
        for f in ("forward_kl", "js_divergence", "alpha_divergence")
        for k in ("sigmoid", "ipo", "robust", "sigmoid_norm")
    ],
)
def test_preference_loss_f_divergences(f_div: str, kind: str) -> None:
    from fastdpo import preference_loss

    pc, pr, rc, rr, len_c, len_r = _pl_inputs(seed=20)
    # log-ratios of a few nats: exp(-logratio) and the alpha exponent stay far from the clamp
    pc, pr = rc + torch.linspace(-2, 2, 7, dtype=torch.float64), rr + torch.linspace(1.5, -1, 7, dtype=torch.float64)
    eps = EPS.get(kind, 0.0)
    # the coefficient is read by alpha_divergence only (the others refuse a non-default one)
    alpha = {"f_alpha_divergence_coef": 0.3} if f_div == "alpha_divergence" else {}
    loss, _ = preference_loss(
        pc,
        pr,
        rc,
        rr,
        loss_type=kind,
        beta=0.2,
        label_smoothing=eps,
        f_divergence_type=f_div,
        chosen_lengths=len_c,
        rejected_lengths=len_r,
        **alpha,
    )
    ref = losses_md(kind, pc, pr, rc, rr, len_c, len_r, beta=0.2, eps=eps, f_div=f_div, alpha=0.3).mean()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)


def test_preference_loss_mixture_and_wpo() -> None:
    """``sum_k w_k * mean(loss_k)``; WPO multiplies each pair by ``w_c * w_r``, ``w = exp(mean_t(logp_t -
    log sum_v p_v^2))``, the weights carrying no gradient -- ``sft`` included, whose per-pair value is the batch
    scalar (TRL 1.16 expands it to every pair before weighting)."""
    from fastdpo import preference_loss

    pc, pr, rc, rr, len_c, len_r = _pl_inputs(seed=21)
    g = torch.Generator().manual_seed(22)
    lsp2_c, lsp2_r = (
        -(torch.rand(7, generator=g, dtype=torch.float64) * 5) * len_c.clamp(min=1),
        -(torch.rand(7, generator=g, dtype=torch.float64) * 5) * len_r.clamp(min=1),
    )
    a, b = pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)
    loss, _ = preference_loss(
        a,
        b,
        rc,
        rr,
        loss_type=["sigmoid", "ipo", "sft"],
        loss_weights=[1.0, 0.5, 0.2],
        beta=0.3,
        chosen_lengths=len_c,
        rejected_lengths=len_r,
        use_weighting=True,
        policy_chosen_log_sum_p2=lsp2_c,
        policy_rejected_log_sum_p2=lsp2_r,
    )
    a2, b2 = pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)
    w = torch.exp((a2.detach() - lsp2_c) / len_c.double().clamp(min=1)) * torch.exp(
        (b2.detach() - lsp2_r) / len_r.double().clamp(min=1)
    )
    args = (a2, b2, rc, rr, len_c, len_r)
    ref = (
        (losses_md("sigmoid", *args, beta=0.3, eps=0) * w).mean()
        + 0.5 * (losses_md("ipo", *args, beta=0.3, eps=0) * w).mean()
        + 0.2 * (losses_md("sft", *args, beta=0.3, eps=0) * w).mean()
    )  # TRL: the batch scalar, per pair
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(torch.autograd.grad(loss, [a, b]), torch.autograd.grad(ref, [a2, b2])):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# nn modules
# ---------------------------------------------------------------------------------------------------------------


def _module_case(seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    b, t, d, v = 3, 6, 12, 157
    x = torch.randn(2 * b, t, d, generator=g)
    w = torch.randn(v, d, generator=g) * 0.4
    bias = torch.randn(v, generator=g) * 0.1
    ref_x = x + 0.2 * torch.randn(2 * b, t, d, generator=g)
    ref_w = w + 0.05 * torch.randn(v, d, generator=g)
    target = torch.randint(0, v, (2 * b, t), generator=g)
    target[:, :2] = IGNORE  # prompt positions
    target[4, 3:] = IGNORE  # a shorter rejected completion
    return x, w, bias, ref_x, ref_w, target


def _module_oracle(
    name: str,
    x,
    w,
    bias,
    ref_x,
    ref_w,
    target,
    *,
    beta: float,
    alpha: float,
    gamma: float,
    eps: float,
    compute_nll: bool,
    average: bool,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Liger's definitions over explicit logits in ``x``'s dtype: the loss and (c, r, chosen / rejected mean logit,
    nll, chosen / rejected rewards, *extra)."""
    p = x.shape[0] // 2
    counts = (target != IGNORE).sum(-1).clamp(min=1).to(x.dtype)
    z = explicit_logits(x, w, bias)
    sums = token_logps_of(z, target).sum(-1)
    logps = sums / counts if average else sums
    c, r = logps[:p], logps[p:]
    nll = -sums[:p].sum() / (target[:p] != IGNORE).sum()
    extra: tuple[torch.Tensor, ...] = ()
    if name == "dpo":
        with torch.no_grad():
            ref_sums = token_logps_of(explicit_logits(ref_x, ref_w), target).sum(-1)
            ref = ref_sums / counts if average else ref_sums
        rc, rr = c - ref[:p], r - ref[p:]
        pref = -F.logsigmoid(beta * (rc - rr)).mean()
        rewards = (beta * rc, beta * rr)
    elif name in ("simpo", "cpo"):
        zz = beta * (c - r) - (gamma if name == "simpo" else 0.0)
        pref = (-(1 - eps) * F.logsigmoid(zz) - eps * F.logsigmoid(-zz)).mean()
        rewards = (beta * c, beta * r)
    else:  # orpo: log odds of average log-probs
        log_odds = (c - r) - (torch.log1p(-torch.exp(c)) - torch.log1p(-torch.exp(r)))
        pref = -beta * F.logsigmoid(log_odds).mean()
        rewards = (beta * c, beta * r)
        extra = (F.logsigmoid(log_odds).mean(), log_odds.mean())
    loss = pref + (alpha * nll if compute_nll else 0.0)
    aux = (c, r, z[:p].mean(), z[p:].mean(), nll if compute_nll else torch.zeros((), dtype=x.dtype), *rewards, *extra)
    return loss, aux


MODULES = {
    "dpo": ("FusedLinearDPOLoss", {"beta": 0.2, "compute_nll_loss": True, "alpha": 0.7}),
    "dpo_avg": ("FusedLinearDPOLoss", {"beta": 0.2, "average_log_prob": True}),
    "simpo": ("FusedLinearSimPOLoss", {"beta": 2.0, "gamma": 0.3, "label_smoothing": 0.1}),
    "cpo": ("FusedLinearCPOLoss", {"beta": 0.1, "alpha": 0.5, "label_smoothing": 0.05}),
    "orpo": ("FusedLinearORPOLoss", {"beta": 0.3}),
}


@pytest.mark.parametrize("grad_in_forward", [False, True], ids=["recompute", "grad_in_forward"])
@pytest.mark.parametrize("case", list(MODULES))
def test_fused_modules(case: str, grad_in_forward: bool) -> None:
    import fastdpo.nn as fnn

    cls_name, opts = MODULES[case]
    name = case.split("_")[0]
    module = getattr(fnn, cls_name)(**opts, grad_in_forward=grad_in_forward)
    x0, w0, bias0, ref_x, ref_w, target = _module_case(seed=30)
    settings = dict(
        beta=opts["beta"],
        alpha=opts.get("alpha", 1.0),
        gamma=opts.get("gamma", 0.0),
        eps=opts.get("label_smoothing", 0.0),
        compute_nll=opts.get("compute_nll_loss", name != "dpo"),
        average=opts.get("average_log_prob", name in ("simpo", "orpo")),
    )
    res = {}
    for kind, cast in (("f64", torch.float64), ("naive", torch.float32), ("op", torch.float32)):
        x, w, b = (t.to(cast).clone().requires_grad_(True) for t in (x0, w0, bias0))
        if kind == "op":
            loss, aux = module(w, x, target, b, ref_x, ref_w) if name == "dpo" else module(w, x, target, b)
        else:
            loss, aux = _module_oracle(name, x, w, b, ref_x.to(cast), ref_w.to(cast), target, **settings)
        grads = torch.autograd.grad(loss, [x, w, b])
        res[kind] = (loss, grads, tuple(a.detach() for a in aux))
    check("loss", res["op"][0], res["naive"][0], res["f64"][0])
    for leaf, got, n, r in zip(("input", "weight", "bias"), res["op"][1], res["naive"][1], res["f64"][1]):
        check(f"grad {leaf}", got, n, r)
    assert len(res["op"][2]) == len(res["f64"][2])
    for i, (got, n, r) in enumerate(zip(res["op"][2], res["naive"][2], res["f64"][2])):
        check(f"aux[{i}]", got, n, r)


def test_dpo_loss_module() -> None:
    from fastdpo.nn import DPOLoss

    pc, pr, rc, rr, len_c, len_r = _pl_inputs(seed=40)
    loss, metrics = DPOLoss(["hinge", "sigmoid_norm"], loss_weights=[0.4, 1.0], beta=0.25)(
        pc, pr, rc, rr, chosen_lengths=len_c, rejected_lengths=len_r
    )
    ref = (
        0.4 * losses_md("hinge", pc, pr, rc, rr, len_c, len_r, beta=0.25, eps=0).mean()
        + losses_md("sigmoid_norm", pc, pr, rc, rr, len_c, len_r, beta=0.25, eps=0).mean()
    )
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    assert float(metrics["rewards/margins"]) == pytest.approx(float((0.25 * ((pc - rc) - (pr - rr))).mean()))
