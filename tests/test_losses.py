"""Preference-loss zoo against independent float64 formulas (TRL 1.16 semantics, LOSSES.md), gradients via autograd.

The reference formulas below are written out from TRL's ``DPOTrainer._compute_loss`` (padded per-token layout where
TRL works on tokens) without calling :mod:`fastdpo.losses`.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import pytest
import torch
from helpers import ref_scores

from fastdpo.losses import (
    F_DIVERGENCE_LOSS_TYPES,
    LOSS_TYPES,
    cpo_loss,
    kto_loss,
    ld_logps,
    orpo_loss,
    preference_loss,
    simpo_loss,
    wpo_weights,
)

D64 = torch.float64


# ----------------------------------------------------------------------------------------------------------------
# independent float64 reference
# ----------------------------------------------------------------------------------------------------------------
def ls(x: torch.Tensor) -> torch.Tensor:
    """log sigmoid written as -log(1 + e^-x) (fine in float64 at the magnitudes used here)."""
    return -torch.log1p(torch.exp(-x))


def sig(x: torch.Tensor) -> torch.Tensor:
    return 1.0 / (1.0 + torch.exp(-x))


def ref_dpo(pc, pr, rc, rr, *, chosen_token_logps=None, pair_w=None, fp16=False, **options):
    """TRL 1.16 loss on float64 per-pair tensors; ``options``: ``preference_loss``'s loss keywords (``loss_type``,
    ``loss_weights``, ``beta``, ``label_smoothing``, ``discopop_tau``, ``f_divergence_type``,
    ``f_alpha_divergence_coef``, ``chosen_lengths``, ``rejected_lengths``), so that one dict drives both;
    chosen_token_logps: list of 1-D tensors (for sft); pair_w: per-pair weights (WPO); fp16: float16 inputs' clamp."""
    assert set(options) <= set(ORACLE_DEFAULTS), set(options) - set(ORACLE_DEFAULTS)
    o = {**ORACLE_DEFAULTS, **options}
    types = [o["loss_type"]] if isinstance(o["loss_type"], str) else o["loss_type"]
    weights = o["loss_weights"] or [1.0] * len(types)
    beta, eps, tau = o["beta"], o["label_smoothing"], o["discopop_tau"]
    fdiv, alpha = o["f_divergence_type"], o["f_alpha_divergence_coef"]
    lc, lr_ = (None if x is None else x.to(D64) for x in (o["chosen_lengths"], o["rejected_lengths"]))
    c, r = pc - rc, pr - rr
    sc, sr = ref_scores(c, fdiv, alpha, fp16), ref_scores(r, fdiv, alpha, fp16)
    d = sc - sr
    total = 0.0
    for t, w in zip(types, weights, strict=True):
        if t == "sigmoid":
            per = -ls(beta * d)
        elif t == "hinge":
            per = torch.clamp(1 - beta * d, min=0)
        elif t == "ipo":
            per = (sc / lc.clamp(min=1) - sr / lr_.clamp(min=1) - 1 / (2 * beta)) ** 2
        elif t == "exo_pair":
            z = beta * d
            per = sig(z) * (ls(z) - math.log(1 - eps)) + sig(-z) * (ls(-z) - math.log(eps))
        elif t == "nca_pair":
            per = -ls(beta * c) - 0.5 * ls(-beta * c) - 0.5 * ls(-beta * r)
        elif t == "robust":
            per = (-(1 - eps) * ls(beta * d) + eps * ls(-beta * d)) / (1 - 2 * eps)
        elif t == "bco_pair":
            per = -ls(beta * c) - ls(-beta * r)
        elif t == "sppo_hard":
            per = (c - 1 / (2 * beta)) ** 2 + (r + 1 / (2 * beta)) ** 2
        elif t in ("aot", "aot_unpaired"):
            a, b = (pc - pr, rc - rr) if t == "aot" else (c, r)
            delta = a[torch.argsort(a)] - b[torch.argsort(b)]
            per = -(1 - eps) * ls(beta * delta) - eps * ls(-beta * delta)
        elif t == "apo_zero":
            per = 1 - sig(beta * c) + sig(beta * r)
        elif t == "apo_down":
            per = sig(beta * c) + 1 - sig(beta * (c - r))
        elif t == "discopop":
            z = beta * d
            m = sig(z / tau)
            per = (1 - m) * (-ls(z)) + m * torch.exp(-z)
        elif t == "sft":
            toks = torch.cat(chosen_token_logps)
            per = (-toks.mean()).expand(pc.shape[0])
        elif t == "sigmoid_norm":
            per = -ls(beta * (sc / lc.clamp(min=1) - sr / lr_.clamp(min=1)))
        else:
            raise AssertionError(t)
        if pair_w is not None:
            per = per * pair_w
        total = total + w * per.mean()
    return total


#: the loss keywords :func:`ref_dpo` reads, at TRL's defaults
ORACLE_DEFAULTS = dict(
    loss_type="sigmoid",
    loss_weights=None,
    beta=0.1,
    label_smoothing=0.0,
    discopop_tau=0.05,
    f_divergence_type="reverse_kl",
    f_alpha_divergence_coef=0.5,
    chosen_lengths=None,
    rejected_lengths=None,
)
QUAD = ("pc", "pr", "rc", "rr")  # the four per-pair sums of make_batch, in preference_loss's order


def chosen_sum_grad(tok_leaves: list[torch.Tensor], sums: torch.Tensor) -> torch.Tensor | None:
    """Gradient wrt each chosen sequence sum when the reference was built from per-token leaves (sum = tokens):
    the common gradient of its tokens (it reaches them through the sum and, for sft, directly); empty rows take the
    gradient that reached the sum."""
    g = [t.grad[0] if t.numel() and t.grad is not None else None for t in tok_leaves]
    if all(x is None for x in g) and sums.grad is None:
        return None
    base = sums.grad if sums.grad is not None else torch.zeros_like(sums)
    return torch.stack([gi if gi is not None else base[i] for i, gi in enumerate(g)])


def make_batch(p: int, seed: int, *, spread: float = 3.0):
    """Random per-token log-probs for p pairs (some completions empty) and their sums."""
    g = torch.Generator().manual_seed(seed)
    lc = torch.randint(1, 9, (p,), generator=g)
    lr_ = torch.randint(1, 9, (p,), generator=g)
    lc[p // 2] = 0  # an empty chosen completion is legal
    toks = {}
    for name, lens in (("pc", lc), ("pr", lr_), ("rc", lc), ("rr", lr_)):
        toks[name] = [-(torch.rand(int(n), generator=g, dtype=D64) * spread) for n in lens]
    sums = {k: torch.stack([t.sum() for t in v]) for k, v in toks.items()}
    # the reference stays near the policy (|log-ratio| of a few nats), as in training
    sums["rc"] = sums["pc"] + torch.randn(p, generator=g, dtype=D64) * 1.5
    sums["rr"] = sums["pr"] + torch.randn(p, generator=g, dtype=D64) * 1.5
    return sums, toks, lc, lr_


# ----------------------------------------------------------------------------------------------------------------
# every loss type, every f-divergence it admits, float32 and float64, gradients
# ----------------------------------------------------------------------------------------------------------------
FDIV_CASES = [
    ("reverse_kl", 0.5),
    ("forward_kl", 0.5),
    ("js_divergence", 0.5),
    ("alpha_divergence", 0.5),
    ("alpha_divergence", 1.0),
    ("alpha_divergence", 1.7),
]
CASES = [(t, f, a) for t in LOSS_TYPES for (f, a) in FDIV_CASES if f == "reverse_kl" or t in F_DIVERGENCE_LOSS_TYPES]


@pytest.mark.parametrize("loss_type,fdiv,alpha", CASES)
def test_loss_types_match_float64_reference(loss_type: str, fdiv: str, alpha: float) -> None:
    p = 7
    sums, toks, lc, lr_ = make_batch(p, seed=zlib.crc32(f"{loss_type}/{fdiv}/{alpha}".encode()))
    eps = 0.2 if loss_type in ("exo_pair", "robust", "aot", "aot_unpaired") else 0.0
    common = dict(
        loss_type=loss_type,
        beta=0.3,
        label_smoothing=eps,
        f_divergence_type=fdiv,
        f_alpha_divergence_coef=alpha,
        discopop_tau=0.05,
        chosen_lengths=lc,
        rejected_lengths=lr_,
    )
    leaves = {k: v.clone().requires_grad_(True) for k, v in sums.items()}
    # the chosen sums are built from per-token leaves so that sft's token mean is connected to them
    tok_leaves = [t.clone().requires_grad_(True) for t in toks["pc"]]
    leaves["pc"] = torch.stack([t.sum() for t in tok_leaves])
    leaves["pc"].retain_grad()
    ref = ref_dpo(*(leaves[k] for k in QUAD), chosen_token_logps=tok_leaves, **common)
    ref.backward()
    ref_grads = {k: None if v.grad is None else v.grad.clone() for k, v in leaves.items()}
    ref_grads["pc"] = chosen_sum_grad(tok_leaves, leaves["pc"])
    rows = lc > 0  # d loss / d sum of an empty completion is not defined by the token-level reference
    # float64 in: float64 math, agreement to rounding, gradients by autograd
    ours64 = {k: v.clone().requires_grad_(True) for k, v in sums.items()}
    loss64, _ = preference_loss(*(ours64[k] for k in QUAD), **common)
    assert loss64.dtype == D64
    loss64.backward()
    torch.testing.assert_close(loss64.detach(), ref.detach(), rtol=1e-10, atol=1e-12)
    for k, got in ours64.items():
        if ref_grads[k] is None:  # sft alone does not depend on the rejected or reference log-probs
            assert got.grad is None or not got.grad.any()
            continue
        sel = rows if k == "pc" else slice(None)
        torch.testing.assert_close(got.grad[sel], ref_grads[k][sel], rtol=1e-9, atol=1e-12)
    # float32 in: float32 out, within float32 rounding of the float64 truth
    ours32 = {k: v.float().requires_grad_(True) for k, v in sums.items()}
    loss32, _ = preference_loss(*(ours32[k] for k in QUAD), **common)
    assert loss32.dtype == torch.float32
    loss32.backward()
    torch.testing.assert_close(loss32.double(), ref.detach(), rtol=2e-5, atol=2e-6)
    for k in ours32:
        if ref_grads[k] is None:
            continue
        sel = rows if k == "pc" else slice(None)
        torch.testing.assert_close(ours32[k].grad.double()[sel], ref_grads[k][sel], rtol=1e-4, atol=1e-5)


def test_alpha_divergence_clamp_large_logratio_and_fp16() -> None:
    g = torch.Generator().manual_seed(3)
    pc = torch.randn(6, generator=g, dtype=D64) * 40 + 150  # (alpha-1)*logratio far above 80
    pr, rc, rr = (torch.randn(6, generator=g, dtype=D64) for _ in range(3))
    for dtype, fp16 in ((torch.float32, False), (torch.float16, True)):
        args = [t.to(dtype) for t in (pc, pr, rc, rr)]
        opts = dict(loss_type="hinge", beta=0.5, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.5)
        loss, _ = preference_loss(*args, **opts)
        ref = ref_dpo(*[t.double() for t in args], fp16=fp16, **opts)
        assert torch.isfinite(loss)
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)


def test_loss_mixture_weights_average_per_type() -> None:
    sums, toks, lc, lr_ = make_batch(9, seed=11)
    opts = dict(
        loss_type=["sigmoid", "sft", "bco_pair", "ipo"],
        loss_weights=[0.7, 1.3, 0.25, 0.05],
        beta=0.2,
        chosen_lengths=lc,
        rejected_lengths=lr_,
    )
    loss, _ = preference_loss(*(sums[k] for k in QUAD), **opts)
    ref = ref_dpo(*(sums[k] for k in QUAD), chosen_token_logps=toks["pc"], **opts)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)


def test_reference_free_dpo_uses_zero_reference() -> None:
    sums, _, _, _ = make_batch(5, seed=2)
    loss, metrics = preference_loss(sums["pc"], sums["pr"], None, None, loss_type="sigmoid", beta=0.1)
    zero = torch.zeros(5, dtype=D64)
    torch.testing.assert_close(loss, ref_dpo(sums["pc"], sums["pr"], zero, zero, loss_type="sigmoid", beta=0.1))
    torch.testing.assert_close(metrics["rewards/chosen"], (0.1 * sums["pc"]).mean())


def test_metrics_trl_definitions() -> None:
    sums, _, _, _ = make_batch(8, seed=5)
    pc, pr, rc, rr = (sums[k].float().requires_grad_(True) for k in ("pc", "pr", "rc", "rr"))
    _, m = preference_loss(pc, pr, rc, rr, beta=0.25)
    c = 0.25 * (sums["pc"] - sums["rc"])
    r = 0.25 * (sums["pr"] - sums["rr"])
    expect = {
        "rewards/chosen": c.mean(),
        "rewards/rejected": r.mean(),
        "rewards/accuracies": torch.tensor(sum(float(a > b) for a, b in zip(c, r, strict=True)) / 8, dtype=D64),
        "rewards/margins": (c - r).mean(),
        "logps/chosen": sums["pc"].mean(),
        "logps/rejected": sums["pr"].mean(),
    }
    assert set(m) == set(expect)
    for k, v in expect.items():
        assert m[k].dim() == 0 and not m[k].requires_grad
        torch.testing.assert_close(m[k].double(), v, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# token-level options: WPO, LD-DPO, sft, on a padded TRL-style layout
# ----------------------------------------------------------------------------------------------------------------
def padded_layout(p: int, seed: int):
    """Build TRL's padded per-token view: [2P, T] token logps, shift completion mask, log-sum-p2, and the flat
    (token_logps, token_pos, seq_ids, log_sum_p2) view the engine would produce."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(0, 7, (2 * p,), generator=g)
    lens[0] = 5
    t = int(lens.max()) + 3
    starts = torch.randint(0, 3, (2 * p,), generator=g)
    mask = torch.zeros(2 * p, t, dtype=D64)
    for s in range(2 * p):
        mask[s, starts[s] : starts[s] + lens[s]] = 1
    tok = -torch.rand(2 * p, t, generator=g, dtype=D64) * 4
    lsp2 = -torch.rand(2 * p, t, generator=g, dtype=D64) * 2
    tok = tok * mask  # TRL's per-token logps are 0 off the completion (labels -100)
    flat = mask.bool()
    seq_ids = torch.arange(2 * p).unsqueeze(1).expand(2 * p, t)[flat]
    pos = (mask.cumsum(1) - 1).long()[flat]
    return tok, mask, lsp2, lens, tok[flat], lsp2[flat], seq_ids, pos


def test_wpo_weights_helper_and_loss() -> None:
    p = 6
    tok, mask, lsp2, lens, ftok, flsp2, seq_ids, _ = padded_layout(p, seed=21)
    # TRL: aligned = (per_token_logps - log_sum_sq_probs) * mask; exp(sum / clamp_min(len, 1))
    ref_w = torch.exp(((tok - lsp2) * mask).sum(1) / mask.sum(1).clamp(min=1))
    w = wpo_weights(ftok.float().requires_grad_(True), flsp2.float(), seq_ids, 2 * p)
    assert not w.requires_grad and w.dtype == torch.float32
    torch.testing.assert_close(w.double(), ref_w, rtol=1e-5, atol=1e-7)

    logps = tok.sum(1)
    ref_logps = -torch.rand(2 * p, generator=torch.Generator().manual_seed(1), dtype=D64) * 10
    lc, lr_ = lens[:p], lens[p:]
    chosen_toks = [tok[s][mask[s].bool()] for s in range(p)]
    lsp2_sum = (lsp2 * mask).sum(1)  # per-sequence log-sum-p2 sums

    def loss_of(fn: Any, types: list[str], chosen: torch.Tensor, **kw: Any) -> Any:
        """``fn`` (the oracle or ``preference_loss``) of ``types`` with ``chosen`` as the policy's chosen sums."""
        opts = dict(loss_type=types, beta=0.4, chosen_lengths=lc, rejected_lengths=lr_)
        return fn(chosen, logps[p:], ref_logps[:p], ref_logps[p:], **opts, **kw)

    def ref_loss(types: list[str], chosen: torch.Tensor, chosen_token_logps: list[torch.Tensor]) -> torch.Tensor:
        return loss_of(ref_dpo, types, chosen, chosen_token_logps=chosen_token_logps, pair_w=ref_w[:p] * ref_w[p:])

    def fast_loss(types: list[str], chosen: torch.Tensor, **weights: torch.Tensor) -> torch.Tensor:
        return loss_of(preference_loss, types, chosen, use_weighting=True, **weights)[0]

    for types in (["sigmoid"], ["ipo", "sft"], ["discopop", "apo_down"]):
        ref = ref_loss(types, logps[:p], chosen_toks)
        # ready weights from the helper
        loss_a = fast_loss(types, logps[:p], wpo_chosen_weights=w[:p], wpo_rejected_weights=w[p:])
        torch.testing.assert_close(loss_a, ref, rtol=1e-5, atol=1e-7)
        pc = logps[:p].clone().requires_grad_(True)
        loss_b = fast_loss(types, pc, policy_chosen_log_sum_p2=lsp2_sum[:p], policy_rejected_log_sum_p2=lsp2_sum[p:])
        torch.testing.assert_close(loss_b, ref, rtol=1e-10, atol=1e-12)
        # weights carry no gradient: d loss / d pc equals the weighted un-differentiated-weight gradient
        tok_leaves = [t.clone().requires_grad_(True) for t in chosen_toks]
        pc_ref = torch.stack([t.sum() for t in tok_leaves])
        pc_ref.retain_grad()
        ref_loss(types, pc_ref, tok_leaves).backward()
        loss_b.backward()
        rows = lc > 0
        torch.testing.assert_close(pc.grad[rows], chosen_sum_grad(tok_leaves, pc_ref)[rows], rtol=1e-9, atol=1e-12)


def test_ld_logps_matches_trl_masks() -> None:
    p = 5
    tok, mask, _, lens, ftok, _, seq_ids, pos = padded_layout(p, seed=8)
    alpha = 0.35
    # TRL: comp_pos = cumsum(mask); shared = min(len_c, len_r); shared: 1 <= pos <= shared; tail: pos > shared
    comp_pos = mask.cumsum(1)
    shared = torch.minimum(lens[:p], lens[p:])
    shared = torch.cat([shared, shared]).to(D64).unsqueeze(1)
    shared_mask = (comp_pos > 0) & (comp_pos <= shared) & mask.bool()
    tail_mask = (comp_pos > shared) & mask.bool()
    tok_leaf = tok.clone().requires_grad_(True)
    ref = (tok_leaf * shared_mask).sum(1) + alpha * (tok_leaf * tail_mask).sum(1)
    g = torch.Generator().manual_seed(0)
    upstream = torch.randn(2 * p, generator=g, dtype=D64)
    (ref * upstream).sum().backward()

    ft = ftok.clone().requires_grad_(True)
    out = ld_logps(ft, pos, seq_ids, lens[:p], lens[p:], alpha)
    assert out.shape == (2 * p,) and out.dtype == D64
    torch.testing.assert_close(out, ref.detach(), rtol=1e-12, atol=1e-12)
    (out * upstream).sum().backward()
    torch.testing.assert_close(ft.grad, tok_leaf.grad[mask.bool()], rtol=1e-12, atol=1e-12)
    out32 = ld_logps(ftok.float(), pos, seq_ids.int(), lens[:p], lens[p:], alpha)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), ref.detach(), rtol=1e-5, atol=1e-5)


def test_sft_with_ld_weighted_logps_uses_plain_nll() -> None:
    p = 4
    tok, mask, _, lens, ftok, _, seq_ids, pos = padded_layout(p, seed=13)
    ld = ld_logps(ftok, pos, seq_ids, lens[:p], lens[p:], 0.5)
    plain = tok.sum(1)
    chosen_toks = [tok[s][mask[s].bool()] for s in range(p)]
    loss, _ = preference_loss(
        ld[:p],
        ld[p:],
        ld[:p] * 0.9,
        ld[p:] * 1.1,
        loss_type=["sft"],
        chosen_lengths=lens[:p],
        policy_chosen_nll_sum=-plain[:p],
    )
    torch.testing.assert_close(loss, -torch.cat(chosen_toks).mean(), rtol=1e-12, atol=1e-12)


def test_sft_empty_batch_is_zero_not_nan() -> None:
    pc = torch.zeros(3, requires_grad=True)
    loss, _ = preference_loss(
        pc,
        torch.zeros(3),
        torch.zeros(3),
        torch.zeros(3),
        loss_type="sft",
        chosen_lengths=torch.zeros(3, dtype=torch.long),
    )
    loss.backward()  # no token carries the loss; the gradient wrt the (empty) sums stays finite
    assert float(loss.detach()) == 0.0 and torch.isfinite(pc.grad).all()


# ----------------------------------------------------------------------------------------------------------------
# invalid input
# ----------------------------------------------------------------------------------------------------------------
def _pairs(p: int = 4):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(p, generator=g) for _ in range(4)]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(loss_type="exo_pair", label_smoothing=0.0), "exo_pair"),
        (dict(loss_type="robust", label_smoothing=0.5), "robust"),
        (dict(loss_type="robust", label_smoothing=0.7), "robust"),
        (dict(loss_type="ipo"), "chosen_lengths"),
        (dict(loss_type="sigmoid_norm", chosen_lengths=torch.ones(4, dtype=torch.long)), "rejected_lengths"),
        (dict(loss_type="sft"), "chosen_lengths"),
        (dict(loss_type="simpo"), "sigmoid.*hinge.*sigmoid_norm"),
        (dict(loss_type=["sigmoid", "bogus"]), "bogus"),
        (dict(loss_type=["sigmoid", "hinge"], loss_weights=[1.0]), "loss_weights"),
        (dict(loss_type="nca_pair", f_divergence_type="forward_kl"), "f_divergence_type"),
        (dict(f_divergence_type="kl"), "f_divergence_type"),
        (dict(loss_type="aot", use_weighting=True), "aot"),
        (dict(use_weighting=True), "use_weighting"),
        (dict(beta=0.0), "beta"),
        (dict(discopop_tau=-1.0), "discopop_tau"),
        (dict(label_smoothing=1.0), "label_smoothing"),
        (dict(chosen_lengths=torch.ones(3, dtype=torch.long)), "chosen_lengths"),
    ],
)
def test_invalid_configurations_raise_value_error(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        preference_loss(*_pairs(), **kwargs)


def test_invalid_tensors() -> None:
    pc, pr, rc, rr = _pairs()
    with pytest.raises(ValueError, match="policy_rejected_logps"):
        preference_loss(pc, pr[:3], rc, rr)
    with pytest.raises(ValueError, match="device"):
        preference_loss(pc, pr, rc, rr.to("meta"))
    with pytest.raises(ValueError, match="1-D"):
        preference_loss(pc.view(2, 2), pr, rc, rr)
    with pytest.raises(ValueError, match="at least one pair"):
        preference_loss(pc[:0], pr[:0], rc[:0], rr[:0])
    with pytest.raises(TypeError, match="policy_chosen_logps"):
        preference_loss(pc.long(), pr, rc, rr)
    with pytest.raises(ValueError, match="both"):
        preference_loss(pc, pr, rc, None)
    with pytest.raises(ValueError, match="seq_ids"):
        ld_logps(
            torch.zeros(3),
            torch.zeros(3, dtype=torch.long),
            torch.tensor([0, 1, 9]),
            torch.ones(2, dtype=torch.long),
            torch.ones(2, dtype=torch.long),
            0.5,
        )
    with pytest.raises(ValueError, match="token_log_sum_p2"):
        wpo_weights(torch.zeros(3), torch.zeros(4), torch.zeros(3, dtype=torch.long), 2)


# ----------------------------------------------------------------------------------------------------------------
# reference-free family
# ----------------------------------------------------------------------------------------------------------------
def _grad_check(fn_ours, fn_ref, tensors: list[torch.Tensor]) -> None:
    a = [t.clone().requires_grad_(True) for t in tensors]
    b = [t.clone().requires_grad_(True) for t in tensors]
    lo, lr_ = fn_ours(*a), fn_ref(*b)
    torch.testing.assert_close(lo, lr_, rtol=1e-10, atol=1e-12)
    lo.backward()
    lr_.backward()
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-9, atol=1e-12)


def test_simpo_matches_paper() -> None:
    sums, _, lc, lr_ = make_batch(7, seed=30)
    beta, gamma, eps = 2.5, 1.2, 0.1

    def ref(pc, pr):
        z = beta * pc / lc.clamp(min=1) - beta * pr / lr_.clamp(min=1) - gamma
        return (-(1 - eps) * ls(z) - eps * ls(-z)).mean()

    _grad_check(
        lambda pc, pr: simpo_loss(pc, pr, lc, lr_, beta=beta, gamma=gamma, label_smoothing=eps)[0],
        ref,
        [sums["pc"], sums["pr"]],
    )
    _, m = simpo_loss(sums["pc"], sums["pr"], lc, lr_, beta=beta, gamma=gamma)
    torch.testing.assert_close(m["rewards/chosen"], (beta * sums["pc"] / lc.clamp(min=1)).mean())


def test_cpo_matches_paper() -> None:
    sums, toks, lc, _ = make_batch(6, seed=31)
    beta, alpha = 0.3, 0.8

    def ref(pc, pr):
        nll = -pc.sum() / sum(len(t) for t in toks["pc"])  # token mean over all chosen tokens
        return (-ls(beta * (pc - pr))).mean() + alpha * nll

    _grad_check(lambda pc, pr: cpo_loss(pc, pr, lc, beta=beta, alpha=alpha)[0], ref, [sums["pc"], sums["pr"]])
    _, m = cpo_loss(sums["pc"], sums["pr"], lc, beta=beta)
    torch.testing.assert_close(m["nll_loss"], -torch.cat(toks["pc"]).mean())


def test_orpo_matches_paper() -> None:
    sums, _, lc, lr_ = make_batch(6, seed=32)
    lc = lc.clamp(min=1)  # ORPO's odds need P(y) < 1
    sums["pc"] = torch.where(sums["pc"] == 0, torch.full_like(sums["pc"], -0.3), sums["pc"])
    beta = 0.2

    def ref(pc, pr):
        pw, pl = torch.exp(pc / lc), torch.exp(pr / lr_.clamp(min=1))
        log_or = torch.log(pw / (1 - pw)) - torch.log(pl / (1 - pl))
        nll = -pc.sum() / lc.sum()
        return nll - beta * ls(log_or).mean()

    _grad_check(lambda pc, pr: orpo_loss(pc, pr, lc, lr_, beta=beta)[0], ref, [sums["pc"], sums["pr"]])
    # average log-probs near 0 (P close to 1) in float32: log(1 - e^a) must not cancel catastrophically
    pc = torch.tensor([-2e-4, -3.0, -1e-2], dtype=D64)
    pr = torch.tensor([-2.0, -3e-4, -5e-3], dtype=D64)
    one = torch.ones(3, dtype=torch.long)
    loss32, m32 = orpo_loss(pc.float(), pr.float(), one, one, beta=1.0)
    lo_c = torch.log(-torch.expm1(pc))  # log(1-P) exactly in float64
    lo_r = torch.log(-torch.expm1(pr))
    log_or = (pc - pr) - (lo_c - lo_r)
    ref = -pc.sum() / 3 - ls(log_or).mean()
    torch.testing.assert_close(loss32.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m32["log_odds_chosen"].double(), log_or.mean(), rtol=1e-5, atol=1e-5)


def test_kto_matches_trl() -> None:
    g = torch.Generator().manual_seed(40)
    n = 9
    pl, rl = -torch.rand(n, generator=g, dtype=D64) * 30, -torch.rand(n, generator=g, dtype=D64) * 30
    des = torch.rand(n, generator=g) > 0.4
    des[0], des[1] = True, False
    kp, kr = -torch.rand(n, generator=g, dtype=D64) * 30, -torch.rand(n, generator=g, dtype=D64) * 28
    beta, wd, wu = 0.2, 1.0, 1.33

    def ref(pl_, rl_):
        kl = max(float((kp - kr).mean()), 0.0)
        lr_ = pl_ - rl_
        losses = [
            wd * (1 - sig(beta * (lr_[i] - kl))) if des[i] else wu * (1 - sig(beta * (kl - lr_[i]))) for i in range(n)
        ]
        return torch.stack(losses).mean()

    _grad_check(
        lambda a, b: kto_loss(
            a, b, des, policy_kl_logps=kp, ref_kl_logps=kr, beta=beta, desirable_weight=wd, undesirable_weight=wu
        )[0],
        ref,
        [pl, rl],
    )
    _, m = kto_loss(pl, rl, des, policy_kl_logps=kp, ref_kl_logps=kr, beta=beta)
    torch.testing.assert_close(m["kl"], (kp - kr).mean().clamp(min=0))
    torch.testing.assert_close(m["rewards/chosen"], (beta * (pl - rl))[des].mean())
    with pytest.raises(ValueError, match="both"):
        kto_loss(pl, rl, des, policy_kl_logps=kp)


# ----------------------------------------------------------------------------------------------------------------
# cross-check against TRL 1.16's own DPOTrainer._compute_loss (a stand-in model returns per-token statistics)
# ----------------------------------------------------------------------------------------------------------------
def _trl_compute_loss(
    cfg: dict,
    token_logps: torch.Tensor,
    lsp2: torch.Tensor,
    completion_mask: torch.Tensor,
    ref_c: torch.Tensor,
    ref_r: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, float]]:
    from collections import defaultdict
    from types import SimpleNamespace

    dpo_trainer = pytest.importorskip("trl.trainer.dpo_trainer")
    rows, length = completion_mask.shape
    outputs = SimpleNamespace(
        log_probs=token_logps,
        entropy=torch.zeros(rows, length - 1),
        mean_logits=torch.zeros(rows, length - 1),
        is_top1=torch.zeros(rows, length - 1, dtype=torch.bool),
        log_sum_sq_probs=lsp2,
    )
    loss_types = cfg["loss_type"] if isinstance(cfg["loss_type"], list) else [cfg["loss_type"]]
    fake = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda t: t, gather=lambda t: t),
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        ld_alpha=cfg.get("ld_alpha"),
        f_divergence_type=cfg.get("f_divergence_type", "reverse_kl"),
        f_alpha_divergence_coef=cfg.get("f_alpha_divergence_coef", 0.5),
        loss_types=loss_types,
        loss_weights=cfg.get("loss_weights") or [1.0] * len(loss_types),
        beta=cfg["beta"],
        label_smoothing=cfg.get("label_smoothing", 0.0),
        use_weighting=cfg.get("use_weighting", False),
        args=SimpleNamespace(discopop_tau=cfg.get("discopop_tau", 0.05)),
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(rows, length, dtype=torch.long),
        "attention_mask": torch.ones(rows, length),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_c,
        "ref_rejected_logps": ref_r,
    }
    loss = dpo_trainer.DPOTrainer._compute_loss(fake, lambda **kw: outputs, inputs, False)
    return loss, {k: v[-1] for k, v in fake._metrics["train"].items()}


TRL_CASES = [dict(loss_type=t) for t in LOSS_TYPES] + [
    dict(loss_type="sigmoid", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3),
    dict(loss_type="ipo", f_divergence_type="forward_kl"),
    dict(loss_type="exo_pair", f_divergence_type="js_divergence"),
    dict(loss_type=["sigmoid", "sft", "bco_pair"], loss_weights=[0.6, 1.0, 0.3]),
    dict(loss_type=["sigmoid", "apo_zero"], use_weighting=True),
    dict(loss_type=["sigmoid_norm", "sft"], ld_alpha=0.4),
    dict(loss_type="robust", ld_alpha=0.0, use_weighting=True),
]


@pytest.mark.parametrize("cfg", TRL_CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_matches_trl_dpo_trainer(cfg: dict) -> None:
    p, length = 5, 12
    g = torch.Generator().manual_seed(zlib.crc32(repr(cfg).encode()))
    mask = torch.zeros(2 * p, length, dtype=torch.long)
    for s in range(2 * p):
        start = int(torch.randint(1, 5, (1,), generator=g))
        n = int(torch.randint(0 if s == 3 else 1, length - start + 1, (1,), generator=g))
        mask[s, start : start + n] = 1
    shift = mask[:, 1:]
    raw = -torch.rand(2 * p, length - 1, generator=g) * 3
    lsp2 = -torch.rand(2 * p, length - 1, generator=g) * 2
    ref = torch.stack([(-torch.rand(length - 1, generator=g) * 3 * shift[s]).sum() for s in range(2 * p)])
    cfg = dict(cfg, beta=0.3, label_smoothing=0.15 if cfg["loss_type"] in ("exo_pair", "robust", "aot") else 0.0)
    ld_alpha = cfg.get("ld_alpha")
    if ld_alpha is not None:  # TRL applies LD weighting to the precomputed reference too
        ref_tok = -torch.rand(2 * p, length - 1, generator=g) * 3 * shift
        comp_pos = shift.cumsum(1)
        shared = torch.minimum(shift[:p].sum(1), shift[p:].sum(1)).repeat(2).unsqueeze(1)
        shared_part = (ref_tok * ((comp_pos > 0) & (comp_pos <= shared))).sum(1)
        ref = shared_part + ld_alpha * (ref_tok * (comp_pos > shared)).sum(1)

    trl_leaf = (raw * shift).requires_grad_(True)
    trl_loss, trl_m = _trl_compute_loss(cfg, trl_leaf, lsp2, mask, ref[:p], ref[p:])
    trl_loss.backward()

    # ours, from the flat completion-token view the engine has
    flat = shift.bool()
    seq_ids = torch.arange(2 * p).unsqueeze(1).expand(2 * p, length - 1)[flat]
    pos = (shift.cumsum(1) - 1)[flat]
    leaf = raw[flat].clone().requires_grad_(True)
    lengths = shift.sum(1)
    from fastdpo.segments import segment_sum

    plain = segment_sum(leaf, seq_ids, 2 * p)
    seq = ld_logps(leaf, pos, seq_ids, lengths[:p], lengths[p:], ld_alpha) if ld_alpha is not None else plain
    kw = {k: v for k, v in cfg.items() if k != "ld_alpha"}
    if cfg.get("use_weighting"):
        w = wpo_weights(leaf, lsp2[flat], seq_ids, 2 * p)
        kw.update(wpo_chosen_weights=w[:p], wpo_rejected_weights=w[p:])
    loss, metrics = preference_loss(
        seq[:p],
        seq[p:],
        ref[:p],
        ref[p:],
        chosen_lengths=lengths[:p],
        rejected_lengths=lengths[p:],
        policy_chosen_nll_sum=-plain[:p],
        policy_rejected_nll_sum=-plain[p:],
        **kw,
    )
    loss.backward()
    torch.testing.assert_close(loss, trl_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(leaf.grad, trl_leaf.grad[flat], rtol=1e-4, atol=1e-6)
    for name, value in metrics.items():
        assert float(value) == pytest.approx(trl_m[name], rel=1e-5, abs=1e-6), name
