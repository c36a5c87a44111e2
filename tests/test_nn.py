"""Loss modules: fused preference losses against Liger 0.8.5 (CPU, compiled=False) and an independent float64
reference; grad-in-forward against recompute; DPOLoss against preference_loss."""

from __future__ import annotations

import pytest
import torch

from fastdpo.losses import preference_loss
from fastdpo.nn import DPOLoss, FusedLinearCPOLoss, FusedLinearDPOLoss, FusedLinearORPOLoss, FusedLinearSimPOLoss

liger_dpo = pytest.importorskip("liger_kernel.chunked_loss.dpo_loss")
from liger_kernel.chunked_loss.cpo_loss import LigerFusedLinearCPOLoss
from liger_kernel.chunked_loss.orpo_loss import LigerFusedLinearORPOLoss
from liger_kernel.chunked_loss.simpo_loss import LigerFusedLinearSimPOLoss

LigerFusedLinearDPOLoss = liger_dpo.LigerFusedLinearDPOLoss
LIGER_TYPES = sorted(LigerFusedLinearDPOLoss._SUPPORTED_LOSS_TYPES)
D64 = torch.float64


def make_inputs(
    b: int = 3, t: int = 7, d: int = 40, v: int = 601, *, seed: int = 0, dtype=torch.float32, empty_row: bool = True
):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * b, t, d, generator=g, dtype=dtype)
    w = torch.randn(v, d, generator=g, dtype=dtype) * 0.2
    bias = torch.randn(v, generator=g, dtype=dtype) * 0.1
    xr = x + 0.1 * torch.randn(x.shape, generator=g, dtype=dtype)
    wr = w + 0.02 * torch.randn(w.shape, generator=g, dtype=dtype)
    br = bias + 0.02 * torch.randn(bias.shape, generator=g, dtype=dtype)
    target = torch.randint(0, v, (2 * b, t), generator=g)
    prompt = torch.randint(1, t - 2, (2 * b,), generator=g)
    for row in range(2 * b):
        target[row, : prompt[row]] = -100  # prompt positions
        tail = int(torch.randint(0, 2, (1,), generator=g))
        if tail:
            target[row, t - tail :] = -100  # padding
    if empty_row:
        target[b + 1] = -100  # a rejected completion without tokens
    return x, w, bias, xr, wr, br, target


def run(module, x, w, bias, target, ref=None, *, scale: float = 1.0):
    """Call a fused module on fresh leaves; return loss, aux, and grads of (input, weight, bias)."""
    xx = x.clone().requires_grad_(True)
    ww = w.clone().requires_grad_(True)
    bb = bias.clone().requires_grad_(True) if bias is not None else None
    args = (ww, xx, target, bb) + (tuple(ref) if ref is not None else ())
    loss, aux = module(*args)
    (loss * scale).backward()
    return loss.detach(), [a.detach() for a in aux], (xx.grad, ww.grad, None if bb is None else bb.grad)


def assert_same(a, b, *, rtol: float, atol: float) -> None:
    la, aux_a, ga = a
    lb, aux_b, gb = b
    torch.testing.assert_close(la.double(), lb.double(), rtol=rtol, atol=atol)
    assert len(aux_a) == len(aux_b)
    for i, (u, v) in enumerate(zip(aux_a, aux_b, strict=True)):
        assert u.shape == v.shape, f"aux output {i}: {u.shape} vs {v.shape}"
        torch.testing.assert_close(u.double(), v.double(), rtol=rtol, atol=atol, msg=lambda m, i=i: f"aux {i}: {m}")
    for name, u, v in zip(("input", "weight", "bias"), ga, gb, strict=True):
        if u is None or v is None:
            assert u is None and v is None, name
            continue
        torch.testing.assert_close(
            u.double(), v.double(), rtol=rtol, atol=atol, msg=lambda m, name=name: f"grad {name}: {m}"
        )


# ----------------------------------------------------------------------------------------------------------------
# drop-in agreement with Liger 0.8.5
# ----------------------------------------------------------------------------------------------------------------
CONFIGS = [
    dict(use_ref_model=True, average_log_prob=False, compute_nll_loss=True, bias=True, empty_row=True),
    dict(use_ref_model=False, average_log_prob=True, compute_nll_loss=False, bias=False, empty_row=False),
]


@pytest.mark.parametrize("cfg", range(len(CONFIGS)))
@pytest.mark.parametrize("loss_type", LIGER_TYPES)
def test_dpo_matches_liger(loss_type: str, cfg: int) -> None:
    c = CONFIGS[cfg]
    x, w, bias, xr, wr, br, target = make_inputs(seed=LIGER_TYPES.index(loss_type) * 7 + cfg, empty_row=c["empty_row"])
    bias_ = bias if c["bias"] else None
    ref = (xr, wr, br if c["bias"] else None) if c["use_ref_model"] else None
    eps = 0.1 if loss_type in ("exo_pair", "robust") else 0.0
    opts = dict(
        beta=0.3,
        alpha=0.7,
        compute_nll_loss=c["compute_nll_loss"],
        use_ref_model=c["use_ref_model"],
        average_log_prob=c["average_log_prob"],
        loss_type=loss_type,
        label_smoothing=eps,
    )
    theirs = run(LigerFusedLinearDPOLoss(compiled=False, **opts), x, w, bias_, target, ref)
    ours = run(FusedLinearDPOLoss(**opts), x, w, bias_, target, ref)
    assert_same(ours, theirs, rtol=2e-5, atol=2e-6)
    if loss_type in ("sigmoid", "apo_down", "exo_pair"):
        gif = run(FusedLinearDPOLoss(grad_in_forward=True, **opts), x, w, bias_, target, ref)
        assert_same(gif, theirs, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("which", ["simpo", "simpo_no_nll", "cpo", "cpo_avg", "orpo"])
def test_simpo_cpo_orpo_match_liger(which: str) -> None:
    x, w, bias, _, _, _, target = make_inputs(seed=50, empty_row=False)
    theirs_cls, ours_cls, opts = {
        "simpo": (
            LigerFusedLinearSimPOLoss,
            FusedLinearSimPOLoss,
            dict(beta=0.4, alpha=0.6, label_smoothing=0.1, gamma=0.3),
        ),
        "simpo_no_nll": (LigerFusedLinearSimPOLoss, FusedLinearSimPOLoss, dict(compute_nll_loss=False)),
        "cpo": (LigerFusedLinearCPOLoss, FusedLinearCPOLoss, dict(beta=0.2, alpha=1.3, label_smoothing=0.05)),
        "cpo_avg": (LigerFusedLinearCPOLoss, FusedLinearCPOLoss, dict(average_log_prob=True)),
        "orpo": (LigerFusedLinearORPOLoss, FusedLinearORPOLoss, dict(beta=0.3)),
    }[which]
    b = bias if which in ("simpo", "cpo", "orpo") else None
    theirs = run(theirs_cls(compiled=False, **opts), x, w, b, target)
    for grad_in_forward in (False, True):
        ours = run(ours_cls(grad_in_forward=grad_in_forward, **opts), x, w, b, target)
        assert_same(ours, theirs, rtol=2e-5, atol=2e-6)


# ----------------------------------------------------------------------------------------------------------------
# beyond Liger: every TRL loss type through the fused module against a float64 reference
# ----------------------------------------------------------------------------------------------------------------
def ref_seq_logps(x, w, bias, target):
    """float64 materialized logits -> summed label log-probs and counts per row."""
    logits = x.double() @ w.double().T + (bias.double() if bias is not None else 0.0)
    lp = torch.log_softmax(logits, dim=-1)
    mask = target != -100
    tok = lp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    return tok.sum(1), mask.sum(1)


def ls(z):
    return -torch.log1p(torch.exp(-z))


def ref_loss(loss_type, pc, pr, rc, rr, nc, nr, beta):
    """A few TRL formulas beyond Liger (float64, written out independently)."""
    c, r = pc - rc, pr - rr
    if loss_type == "ipo":
        return ((c / nc.clamp(min=1) - r / nr.clamp(min=1) - 1 / (2 * beta)) ** 2).mean()
    if loss_type == "sigmoid_norm":
        return (-ls(beta * (c / nc.clamp(min=1) - r / nr.clamp(min=1)))).mean()
    if loss_type == "sft":
        return -pc.sum() / nc.sum()
    if loss_type == "aot":
        a, b = pc - pr, rc - rr
        return (-ls(beta * (a[a.argsort()] - b[b.argsort()]))).mean()
    if loss_type == "aot_unpaired":
        return (-ls(beta * (c[c.argsort()] - r[r.argsort()]))).mean()
    if loss_type == "js_sigmoid":
        sc = torch.log(2 * torch.exp(c) / (torch.exp(c) + 1))
        sr = torch.log(2 * torch.exp(r) / (torch.exp(r) + 1))
        return (-ls(beta * (sc - sr))).mean()
    raise AssertionError(loss_type)


@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid_norm", "sft", "aot", "aot_unpaired", "mixture", "js"])
@pytest.mark.parametrize("grad_in_forward", [False, True])
def test_trl_loss_types_vs_float64(loss_type: str, grad_in_forward: bool) -> None:
    x, w, bias, xr, wr, br, target = make_inputs(b=4, seed=90, dtype=D64)
    beta = 0.5
    kw: dict = dict(loss_type=loss_type)
    if loss_type == "mixture":
        kw = dict(loss_type=["sigmoid_norm", "sft"], loss_weights=[0.8, 0.3])
    if loss_type == "js":
        kw = dict(loss_type="sigmoid", f_divergence_type="js_divergence")
    module = FusedLinearDPOLoss(beta=beta, grad_in_forward=grad_in_forward, **kw)
    ours = run(module, x, w, bias, target, (xr, wr, br))

    leaves = [t.clone().requires_grad_(True) for t in (x, w, bias)]
    s, n = ref_seq_logps(*leaves, target)
    with torch.no_grad():
        sr_, _ = ref_seq_logps(xr, wr, br, target)
    p = x.shape[0] // 2
    args = (s[:p], s[p:], sr_[:p], sr_[p:], n[:p].double(), n[p:].double(), beta)
    if loss_type == "mixture":
        ref = 0.8 * ref_loss("sigmoid_norm", *args) + 0.3 * ref_loss("sft", *args)
    elif loss_type == "js":
        ref = ref_loss("js_sigmoid", *args)
    else:
        ref = ref_loss(loss_type, *args)
    ref.backward()
    # float64 inputs; per-sequence log-probs and the loss are float32 by design, hence float32-level tolerances
    torch.testing.assert_close(ours[0].double(), ref.detach(), rtol=2e-6, atol=1e-7)
    for got, want in zip(ours[2], leaves, strict=True):
        torch.testing.assert_close(got.double(), want.grad, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(ours[1][0].double(), s[:p].detach(), rtol=2e-6, atol=1e-6)  # chosen_logps


def test_grad_in_forward_scales_by_grad_output() -> None:
    x, w, bias, xr, wr, br, target = make_inputs(seed=5)
    opts = dict(loss_type=["sigmoid", "bco_pair"], loss_weights=[1.0, 0.5], compute_nll_loss=True)
    a = run(FusedLinearDPOLoss(**opts), x, w, bias, target, (xr, wr, br), scale=2.5)
    b = run(FusedLinearDPOLoss(grad_in_forward=True, **opts), x, w, bias, target, (xr, wr, br), scale=2.5)
    assert_same(a, b, rtol=1e-5, atol=1e-6)


def test_no_vocabulary_sized_activation_is_saved() -> None:
    """Nothing of size (tokens x V) is kept for backward (head asked to keep no logits tiles)."""
    b, t, d, v = 3, 16, 24, 997
    x, w, bias, xr, wr, br, target = make_inputs(b=b, t=t, d=d, v=v, seed=9)
    m = int((target != -100).sum())
    assert m > d  # so the weight itself (V x D) is smaller than any tokens x V block
    saved: list[torch.Size] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.shape)
        return tensor

    module = FusedLinearDPOLoss(keep_logits_bytes=0)
    xx, ww = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t_: t_):
        loss, _ = module(ww, xx, target, bias, xr, wr, br)
    loss.backward()
    assert saved, "expected the head to save its O(N) state"
    biggest = max(torch.Size(s_).numel() for s_ in saved)
    assert biggest <= max(v * d, 2 * b * t * d), f"a saved tensor of {biggest} elements (tokens x V = {m * v})"


# ----------------------------------------------------------------------------------------------------------------
# DPOLoss and validation
# ----------------------------------------------------------------------------------------------------------------
def test_dpo_loss_module_matches_function() -> None:
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (-torch.rand(5, generator=g) * 20 for _ in range(4))
    lc, lr_ = torch.randint(1, 9, (5,), generator=g), torch.randint(1, 9, (5,), generator=g)
    module = DPOLoss(["ipo", "robust"], loss_weights=[0.5, 2.0], beta=0.2, label_smoothing=0.2)
    loss, metrics = module(pc, pr, rc, rr, chosen_lengths=lc, rejected_lengths=lr_)
    ref, ref_m = preference_loss(
        pc,
        pr,
        rc,
        rr,
        loss_type=["ipo", "robust"],
        loss_weights=[0.5, 2.0],
        beta=0.2,
        label_smoothing=0.2,
        chosen_lengths=lc,
        rejected_lengths=lr_,
    )
    torch.testing.assert_close(loss, ref)
    assert metrics.keys() == ref_m.keys()
    with pytest.raises(TypeError, match="unexpected"):
        module(pc, pr, rc, rr, chosen_lenghts=lc)
    with pytest.raises(ValueError, match="exo_pair"):
        DPOLoss("exo_pair")


def test_fused_module_validation() -> None:
    x, w, bias, xr, wr, br, target = make_inputs(seed=3)
    with pytest.raises(ValueError, match="robust"):
        FusedLinearDPOLoss(loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="sigmoid"):
        FusedLinearDPOLoss(loss_type="simpo")
    with pytest.raises(TypeError):
        FusedLinearDPOLoss(not_an_option=1)
    module = FusedLinearDPOLoss()
    with pytest.raises(ValueError, match="ref_input"):
        module(w, x, target, bias)
    with pytest.raises(ValueError, match="rows"):
        module(w, x[:5], target[:5], bias, xr[:5], wr, br)
    with pytest.raises(ValueError, match="target"):
        module(w, x, target[:, :-1], bias, xr, wr, br)
    with pytest.raises(ValueError, match="lin_weight"):
        module(w[:, :-1], x, target, bias, xr, wr, br)
    bad = target.clone()
    bad[0, -1] = w.shape[0]
    with pytest.raises(ValueError, match="out of range"):
        module(w, x, bad, bias, xr, wr, br)


def test_liger_positional_constructor_order() -> None:
    """Positional arguments mean the same thing as in Liger's constructor (discopop reads discopop_tau: fastdpo
    refuses a discopop_tau that the selected loss would ignore)."""
    ours = FusedLinearDPOLoss(-1, 0.25, 0.5, True, False, False, True, 2, "discopop", 0.0, 0.1)
    theirs = LigerFusedLinearDPOLoss(-1, 0.25, 0.5, True, False, False, True, 2, "discopop", 0.0, 0.1)
    for name in (
        "ignore_index",
        "beta",
        "alpha",
        "compute_nll_loss",
        "use_ref_model",
        "average_log_prob",
        "loss_type",
        "label_smoothing",
        "discopop_tau",
    ):
        assert getattr(ours, name) == getattr(theirs, name), name
    x, w, bias, _, _, _, target = make_inputs(seed=4, empty_row=False)
    target = target.masked_fill(target == -100, -1)
    assert_same(run(ours, x, w, bias, target), run(theirs, x, w, bias, target), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_error_no_worse_than_liger(dtype: torch.dtype) -> None:
    """Error against a float64 truth (Liger's module run in float64 on the same rounded inputs) no larger than
    Liger's own in ``dtype``."""
    x, w, bias, xr, wr, br, target = make_inputs(b=2, t=6, seed=12, v=1001, d=48)
    opts = dict(compute_nll_loss=True, beta=0.2)
    low = [t.to(dtype) for t in (x, w, bias, xr, wr, br)]
    up = [t.double() for t in low]
    truth = run(LigerFusedLinearDPOLoss(compiled=False, **opts), *up[:3], target, up[3:])
    ours = run(FusedLinearDPOLoss(**opts), *low[:3], target, low[3:])
    theirs = run(LigerFusedLinearDPOLoss(compiled=False, **opts), *low[:3], target, low[3:])

    def errors(res) -> list[float]:
        out = [float((res[0].double() - truth[0]).abs())]
        out += [float((res[1][i].double() - truth[1][i]).abs().max()) for i in (0, 1, 4, 5, 6)]  # logps, nll, rewards
        out += [float((g.double() - t).abs().max() / t.abs().max()) for g, t in zip(res[2], truth[2], strict=True)]
        return out

    # both round the logit gradient to ``dtype`` before the GEMMs (the half-precision contract), so a gradient entry
    # may land one rounding away from Liger's: the tolerance is a tenth of the dtype's relative resolution
    tol = 0.1 * torch.finfo(dtype).eps
    for mine, liger in zip(errors(ours), errors(theirs), strict=True):
        assert mine <= liger + tol, (errors(ours), errors(theirs))


def test_grad_in_forward_path_is_taken_for_pair_local_losses_only() -> None:
    x, w, bias, xr, wr, br, target = make_inputs(seed=6)
    ww, xx = w.clone().requires_grad_(True), x.clone().requires_grad_(True)
    loss, _ = FusedLinearDPOLoss(loss_type="robust", label_smoothing=0.2, grad_in_forward=True)(
        ww, xx, target, bias, xr, wr, br
    )
    assert "StoredGrad" in type(loss.grad_fn).__name__
    loss, _ = FusedLinearDPOLoss(loss_type=["sigmoid", "aot"], grad_in_forward=True)(ww, xx, target, bias, xr, wr, br)
    assert "StoredGrad" not in type(loss.grad_fn).__name__  # batch-coupled: recompute path


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("grad_in_forward", [False, True])
def test_triton_backend_matches_torch_backend(grad_in_forward: bool, device: str) -> None:
    """The head's Triton kernels (interpreter on CPU, compiled on CUDA under `pytest -m gpu`) give the torch path's
    results."""
    pytest.importorskip("triton")
    import os

    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1 (set by conftest)")
    x, w, bias, xr, wr, br, target = (t.to(device) for t in make_inputs(b=2, t=5, d=32, v=301, seed=3))
    opts = dict(grad_in_forward=grad_in_forward, compute_nll_loss=True, loss_type=["sigmoid", "ipo"])
    a = run(FusedLinearDPOLoss(backend="torch", **opts), x, w, bias, target, (xr, wr, br))
    b = run(FusedLinearDPOLoss(backend="triton", **opts), x, w, bias, target, (xr, wr, br))
    assert_same(a, b, rtol=1e-5, atol=1e-6)
