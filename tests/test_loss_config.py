"""One loss configuration (issue 14): :class:`PreferenceLossConfig` gives every entry point the loss its keywords give,
refuses invalid and conflicting configurations and options the selected loss would ignore; one definition of
pair-local losses; the reference-free defaults and TRL's metric names in one place."""

from __future__ import annotations

import inspect
import subprocess
import sys
import warnings

import pytest
import torch
from helpers import dpo_config, tiny_trainer

from fastdpo.collator import PreferenceCollator
from fastdpo.engine import DPOEngine
from fastdpo.losses import (
    PreferenceLossConfig,
    is_pair_local,
    normalize_loss_config,
    partial_preference_loss,
    preference_loss,
    simpo_loss,
)
from fastdpo.losses.metrics import REWARD_METRICS, TOKEN_METRICS, TRL_METRIC_ORDER
from fastdpo.nn import DPOLoss, FusedLinearDPOLoss, FusedLinearSimPOLoss
from fastdpo.tiny import make_model, make_tokenizer, preference_rows

P = 5
CONFIGS = {
    "mixture": dict(loss_type=["sigmoid", "ipo", "sft"], loss_weights=[0.7, 0.2, 0.5], beta=0.3),
    "robust-js": dict(loss_type="robust", label_smoothing=0.2, f_divergence_type="js_divergence", beta=0.2),
    "alpha-div": dict(loss_type="sigmoid_norm", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3),
    "discopop": dict(loss_type="discopop", discopop_tau=0.2, beta=0.4),
    "aot": dict(loss_type=["aot", "hinge"], label_smoothing=0.1),
    "wpo": dict(loss_type=["sigmoid", "nca_pair"], use_weighting=True, beta=0.25),
}


def _pairs(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr = (-torch.rand(P, generator=g, dtype=torch.float64).to(dtype) * 20 - 1 for _ in range(4))
    w_c, w_r = (torch.rand(P, generator=g, dtype=torch.float64).to(dtype) + 0.1 for _ in range(2))
    return dict(
        pc=pc,
        pr=pr,
        rc=rc,
        rr=rr,
        chosen_lengths=torch.randint(1, 9, (P,), generator=g),
        rejected_lengths=torch.randint(1, 9, (P,), generator=g),
        wpo_chosen_weights=w_c,
        wpo_rejected_weights=w_r,
    )


def _per_batch(x: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    keys = ["chosen_lengths", "rejected_lengths"]
    if config.get("use_weighting"):
        keys += ["wpo_chosen_weights", "wpo_rejected_weights"]
    return {k: x[k] for k in keys}


# ------------------------------------------------------------------------------------------ same loss either way
@pytest.mark.parametrize("name", list(CONFIGS))
def test_preference_loss_and_dpo_loss_module_take_the_config(name: str) -> None:
    kw = CONFIGS[name]
    config = PreferenceLossConfig(**kw)
    x = _pairs(seed=len(name))
    per_batch = _per_batch(x, kw)
    args = (x["pc"], x["pr"], x["rc"], x["rr"])
    by_kw, m_kw = preference_loss(*args, **kw, **per_batch)
    by_cfg, m_cfg = preference_loss(*args, loss_config=config, **per_batch)
    assert torch.equal(by_cfg, by_kw) and m_cfg.keys() == m_kw.keys()
    # a keyword that agrees with the config is accepted
    agree, _ = preference_loss(*args, loss_config=config, beta=config.beta, **per_batch)
    assert torch.equal(agree, by_kw)
    module_kw, _ = DPOLoss(**kw)(*args, **per_batch)
    module_cfg, _ = DPOLoss(loss_config=config)(*args, **per_batch)
    assert torch.equal(module_kw, by_kw) and torch.equal(module_cfg, by_kw)


@pytest.mark.parametrize("grad_in_forward", [False, True])
@pytest.mark.parametrize("name", ["mixture", "robust-js", "aot"])
def test_fused_dpo_module_takes_the_config(name: str, grad_in_forward: bool) -> None:
    kw = CONFIGS[name]
    g = torch.Generator().manual_seed(7)
    b, t, d, v = 3, 6, 24, 97
    x = torch.randn(2 * b, t, d, generator=g)
    w = torch.randn(v, d, generator=g) * 0.2
    xr, wr = x + 0.1 * torch.randn(x.shape, generator=g), w + 0.02 * torch.randn(w.shape, generator=g)
    target = torch.randint(0, v, (2 * b, t), generator=g)
    target[:, :2] = -100
    results = []
    for module in (
        FusedLinearDPOLoss(grad_in_forward=grad_in_forward, **kw),
        FusedLinearDPOLoss(grad_in_forward=grad_in_forward, loss_config=PreferenceLossConfig(**kw)),
    ):
        ww = w.clone().requires_grad_(True)
        loss, aux = module(ww, x, target, None, xr, wr, None)
        loss.backward()
        results.append((loss.detach(), aux, ww.grad))
    (l0, a0, g0), (l1, a1, g1) = results
    assert torch.equal(l1, l0) and torch.equal(g1, g0)
    for p, q in zip(a0, a1, strict=True):
        assert torch.equal(p, q)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.mark.parametrize("grad_in_forward", [False, True])
def test_engine_takes_the_config(tok, grad_in_forward: bool) -> None:
    kw = dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.3], beta=0.2, use_weighting=True, ld_alpha=0.5)
    batch = PreferenceCollator(tok, packing="padding_free")(preference_rows(3, seed=5))
    ref = make_model("llama", tok, attn_implementation="eager", seed=1)
    results = []
    for how in ("keywords", "config"):
        policy = make_model("llama", tok, attn_implementation="eager", seed=0)
        opts = kw if how == "keywords" else {"loss_config": PreferenceLossConfig(**kw)}
        engine = DPOEngine(policy, ref, grad_in_forward=grad_in_forward, **opts)
        assert engine.loss_config == PreferenceLossConfig(**kw)
        loss, metrics = engine.step(batch)
        loss.backward()
        results.append((loss.detach(), metrics, [p.grad for p in policy.parameters()]))
    (l0, m0, g0), (l1, m1, g1) = results
    assert torch.equal(l1, l0) and m1.keys() == m0.keys()
    for a, b in zip(g0, g1, strict=True):
        assert torch.equal(a, b)


def test_trainer_takes_the_config(tmp_path) -> None:
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    from trl import DPOConfig

    kw = dict(loss_type=["robust"], label_smoothing=0.2, beta=0.3)

    def first_loss(args_kw: dict, trainer_kw: dict) -> float:
        # the loss fields left to args_kw: DPOConfig's defaults, not the tiny runs' beta
        args = dpo_config(tmp_path, max_steps=1, gradient_checkpointing=False, **{"beta": DPOConfig.beta, **args_kw})
        trainer = tiny_trainer(args, rows_seed=3, **trainer_kw)
        assert trainer._engine().loss_config == PreferenceLossConfig(**kw)
        torch.manual_seed(1234)
        trainer.train()
        return next(h["loss"] for h in trainer.state.log_history if "loss" in h)

    assert first_loss(kw, {}) == first_loss({}, {"loss_config": PreferenceLossConfig(**kw)})
    with pytest.raises(ValueError, match="conflicts with loss_config.beta"):
        first_loss({"beta": 0.5}, {"loss_config": PreferenceLossConfig(**kw)})
    # an option TRL would silently ignore (sigmoid does not read label_smoothing)
    with pytest.raises(ValueError, match="label_smoothing=0.1 is read only by"):
        first_loss({"label_smoothing": 0.1}, {})


# ------------------------------------------------------------------------------------------ invalid configurations
# (keywords, exception, message): the messages normalize_loss_config gave before the config existed
INVALID = [
    (dict(loss_type="nope"), ValueError, "Unknown loss_type 'nope': valid loss types are"),
    (dict(loss_type=[]), ValueError, "loss_type must name at least one loss type"),
    (dict(loss_type=None), TypeError, "loss_type must be a loss type name or a list of names"),
    (dict(loss_type=["sigmoid", "ipo"], loss_weights=[1.0]), ValueError, "loss_weights has 1 entries but loss_type"),
    (dict(beta=0.0), ValueError, "beta must be > 0, got 0.0"),
    (dict(beta="0.1"), TypeError, "beta must be a float, got str"),
    (dict(beta=float("nan")), ValueError, "beta must be finite"),
    (dict(loss_type="exo_pair"), ValueError, "loss_type 'exo_pair' needs label_smoothing > 0"),
    (
        dict(loss_type="robust", label_smoothing=0.5),
        ValueError,
        r"loss_type 'robust' needs label_smoothing in \[0, 0.5\)",
    ),
    (dict(label_smoothing=1.0, loss_type="aot"), ValueError, r"label_smoothing must lie in \[0, 1\), got 1.0"),
    (dict(f_divergence_type="tv"), ValueError, "Unknown f_divergence_type 'tv'"),
    (dict(loss_type="hinge", f_divergence_type="forward_kl"), ValueError, None),  # hinge is an f-divergence type
    (
        dict(loss_type="bco_pair", f_divergence_type="forward_kl"),
        ValueError,
        "f_divergence_type='forward_kl' is only defined for loss types",
    ),
    (dict(loss_type="discopop", discopop_tau=0.0), ValueError, "discopop_tau must be > 0, got 0.0"),
    (dict(loss_type="aot", use_weighting=True), ValueError, "use_weighting \\(WPO\\) is not defined for 'aot'"),
    (dict(ld_alpha=1.5), ValueError, r"ld_alpha must be None or a number in \[0, 1\], got 1.5"),
]


@pytest.mark.parametrize("case", range(len(INVALID)))
def test_invalid_configs_raise_at_construction(case: int) -> None:
    kw, exc, message = INVALID[case]
    if message is None:  # a valid combination (hinge accepts forward_kl)
        PreferenceLossConfig(**kw)
        return
    with pytest.raises(exc, match=message):
        PreferenceLossConfig(**kw)
    if "ld_alpha" in kw:  # a token-level option: DPOEngine's keyword (tests/test_engine.py::test_bad_arguments)
        return
    x = _pairs()
    # every entry point reports the configuration's own error
    with pytest.raises(exc, match=message):
        preference_loss(
            x["pc"],
            x["pr"],
            x["rc"],
            x["rr"],
            chosen_lengths=x["chosen_lengths"],
            rejected_lengths=x["rejected_lengths"],
            **kw,
        )
    with pytest.raises(exc, match=message):
        DPOLoss(**kw)
    with pytest.raises(exc, match=message):
        normalize_loss_config(
            kw.get("loss_type", "sigmoid"),
            kw.get("loss_weights"),
            beta=kw.get("beta", 0.1),
            label_smoothing=kw.get("label_smoothing", 0.0),
            f_divergence_type=kw.get("f_divergence_type", "reverse_kl"),
            f_alpha_divergence_coef=0.5,
            discopop_tau=kw.get("discopop_tau", 0.05),
            use_weighting=kw.get("use_weighting", False),
        )


def test_config_is_frozen_and_normalized() -> None:
    config = PreferenceLossConfig(["sigmoid", "ipo"], [1, 2], beta=1)
    assert config.loss_type == ("sigmoid", "ipo") and config.loss_weights == (1.0, 2.0) and config.beta == 1.0
    assert PreferenceLossConfig("sigmoid").loss_weights == (1.0,)
    with pytest.raises(AttributeError):
        config.beta = 0.5  # type: ignore[misc]
    with pytest.raises(ValueError, match="beta must be > 0"):
        config.replace(beta=-1.0)
    assert hash(config) == hash(PreferenceLossConfig(("sigmoid", "ipo"), (1.0, 2.0), beta=1.0))


def test_conflicting_keyword_and_config_raise() -> None:
    config = PreferenceLossConfig("ipo", beta=0.3)
    x = _pairs()
    args = (x["pc"], x["pr"], x["rc"], x["rr"])
    lengths = dict(chosen_lengths=x["chosen_lengths"], rejected_lengths=x["rejected_lengths"])
    with pytest.raises(ValueError, match=r"beta=0.5 conflicts with loss_config.beta=0.3"):
        preference_loss(*args, loss_config=config, beta=0.5, **lengths)
    with pytest.raises(ValueError, match="loss_type='hinge' conflicts with loss_config.loss_type"):
        preference_loss(*args, loss_config=config, loss_type="hinge", **lengths)
    with pytest.raises(ValueError, match="conflicts"):
        DPOLoss("hinge", loss_config=config)
    with pytest.raises(ValueError, match="conflicts"):
        FusedLinearDPOLoss(beta=0.5, loss_config=config)
    with pytest.raises(TypeError, match="loss_config must be a PreferenceLossConfig"):
        preference_loss(*args, loss_config={"beta": 0.3}, **lengths)  # type: ignore[arg-type]
    # agreeing keywords are fine, in any spelling
    loss, _ = preference_loss(*args, loss_config=config, loss_type=["ipo"], beta=0.3, **lengths)
    assert torch.equal(loss, preference_loss(*args, loss_type="ipo", beta=0.3, **lengths)[0])


# ------------------------------------------------------------------------------------------ options that are not read
@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(loss_type="sigmoid", label_smoothing=0.1), "label_smoothing=0.1 is read only by loss types"),
        (dict(loss_type=["ipo", "hinge"], label_smoothing=0.3), "label_smoothing=0.3 is read only by loss types"),
        (dict(f_alpha_divergence_coef=0.3), "f_alpha_divergence_coef=0.3 is read only with f_divergence_type"),
        (dict(f_divergence_type="js_divergence", f_alpha_divergence_coef=0.3), "f_alpha_divergence_coef=0.3"),
        (dict(loss_type="sigmoid", discopop_tau=0.2), "discopop_tau=0.2 is read only by loss_type 'discopop'"),
    ],
)
def test_options_the_loss_would_ignore_raise(kw: dict, message: str) -> None:
    """Before the config, each of these was accepted and silently had no effect (as in TRL 1.16 and Liger)."""
    x = _pairs()
    lengths = dict(chosen_lengths=x["chosen_lengths"], rejected_lengths=x["rejected_lengths"])
    with pytest.raises(ValueError, match=message):
        preference_loss(x["pc"], x["pr"], x["rc"], x["rr"], **kw, **lengths)
    with pytest.raises(ValueError, match=message):
        DPOLoss(**kw)
    with pytest.raises(ValueError, match=message):
        FusedLinearDPOLoss(**kw)
    with pytest.raises(ValueError, match=message):
        PreferenceLossConfig(**kw)


def test_token_level_options_are_refused_where_there_are_no_tokens() -> None:
    x = _pairs()
    args = (x["pc"], x["pr"], x["rc"], x["rr"])
    with pytest.raises(ValueError, match="ld_alpha"):
        preference_loss(*args, loss_config=PreferenceLossConfig(ld_alpha=0.5))
    with pytest.raises(ValueError, match="ld_alpha"):
        DPOLoss(loss_config=PreferenceLossConfig(ld_alpha=0.5))
    with pytest.raises(ValueError, match="use_weighting"):
        FusedLinearDPOLoss(loss_config=PreferenceLossConfig(use_weighting=True))
    with pytest.raises(ValueError, match="ld_alpha"):
        FusedLinearDPOLoss(loss_config=PreferenceLossConfig(ld_alpha=0.5))


# ------------------------------------------------------------------------------------------ pair-local, one definition
def test_pair_local_definition() -> None:
    assert is_pair_local(["sigmoid", "sft"]) and is_pair_local(["sft"])
    assert not is_pair_local(["sigmoid", "aot"]) and not is_pair_local(["aot_unpaired"])
    assert is_pair_local(["sigmoid"], use_weighting=True)
    assert not is_pair_local(["sigmoid", "sft"], use_weighting=True)  # (sum nll / N) * mean(w): batch-coupled
    assert PreferenceLossConfig(["ipo", "sft"]).pair_local


@pytest.mark.parametrize(
    "kw",
    [
        dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.4]),
        dict(loss_type=["sft", "robust"], label_smoothing=0.2, use_weighting=True),
    ],
)
def test_partial_losses_add_up_to_the_batch_loss(kw: dict) -> None:
    """The definition is right: pair by pair with the batch totals gives the batch loss exactly when pair-local
    (``sft`` included), and the batch-coupled configuration refuses to be split."""
    config = PreferenceLossConfig(**kw)
    x = _pairs(seed=3, dtype=torch.float64)
    w = (
        dict(wpo_chosen_weights=x["wpo_chosen_weights"], wpo_rejected_weights=x["wpo_rejected_weights"])
        if config.use_weighting
        else {}
    )
    full, _ = preference_loss(
        x["pc"],
        x["pr"],
        x["rc"],
        x["rr"],
        loss_config=config,
        chosen_lengths=x["chosen_lengths"],
        rejected_lengths=x["rejected_lengths"],
        **w,
    )
    n_tok = x["chosen_lengths"].double().sum()

    def part(i: int) -> torch.Tensor:
        s = slice(i, i + 1)
        return partial_preference_loss(
            x["pc"][s],
            x["pr"][s],
            x["rc"][s],
            x["rr"][s],
            loss_config=config,
            num_pairs=P,
            num_chosen_tokens=n_tok,
            chosen_lengths=x["chosen_lengths"][s],
            rejected_lengths=x["rejected_lengths"][s],
        )

    if not config.pair_local:
        with pytest.raises(ValueError, match="couples the pairs"):
            part(0)
        return
    torch.testing.assert_close(sum(part(i) for i in range(P)), full, rtol=1e-14, atol=0)


def _recording_head(monkeypatch) -> list:
    import fastdpo.head.grad_in_forward as head

    seen: list = []
    original = head.linear_logprobs_loss_grad_in_forward

    def spy(*args, **kwargs):
        seen.append(kwargs.get("groups"))
        return original(*args, **kwargs)

    monkeypatch.setattr(head, "linear_logprobs_loss_grad_in_forward", spy)
    return seen


@pytest.mark.parametrize("use_weighting", [False, True])
def test_engine_and_fused_module_agree_on_sft_grouping(tok, monkeypatch, use_weighting: bool) -> None:
    """The engine used to run ``sft`` as one batch group (its own pair-local table left it out) while the fused
    module ran it pair by pair (it only excluded aot/aot_unpaired): now both follow :func:`is_pair_local` -- pair
    groups for sft, one batch group for WPO-weighted sft -- and give the recompute path's loss and gradients."""
    seen = _recording_head(monkeypatch)
    kw = dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], beta=0.2, use_weighting=use_weighting)
    batch = PreferenceCollator(tok, packing="padding_free")(preference_rows(4, seed=21))
    ref = make_model("llama", tok, attn_implementation="eager", seed=1)
    results = []
    for gif in (False, True):
        policy = make_model("llama", tok, attn_implementation="eager", seed=0)
        loss, _ = DPOEngine(policy, ref, grad_in_forward=gif, **kw).step(batch)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in policy.parameters()]))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    for a, b in zip(g0, g1, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * float(a.abs().max()) + 1e-9)
    assert len(seen) == 1
    p = int(batch["num_pairs"])
    if use_weighting:
        assert seen[0] is None  # one group of all sequences
    else:
        assert [g.tolist() for g in seen[0]] == [[i, p + i] for i in range(p)]
    if use_weighting:
        return  # the fused module has no WPO
    seen.clear()
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(6, 5, 16, generator=g), torch.randn(53, 16, generator=g) * 0.3
    target = torch.randint(0, 53, (6, 5), generator=g)
    target[:, 0] = -100
    module = FusedLinearDPOLoss(
        grad_in_forward=True, use_ref_model=False, **{k: v for k, v in kw.items() if k != "use_weighting"}
    )
    module(w.clone().requires_grad_(True), x, target)
    assert [g.tolist() for g in seen[0]] == [[i, 3 + i] for i in range(3)]


# ------------------------------------------------------------------------------------------ names that say one thing
def test_simpo_defaults_match_the_module_liger_and_trl() -> None:
    def defaults(fn, names):
        params = inspect.signature(fn).parameters
        return {n: params[n].default for n in names}

    functional = defaults(simpo_loss, ("beta", "gamma"))
    assert functional == {"beta": 0.1, "gamma": 0.5}
    assert defaults(FusedLinearSimPOLoss.__init__, ("beta", "gamma")) == functional
    liger = pytest.importorskip("liger_kernel.chunked_loss.simpo_loss")
    assert defaults(liger.LigerFusedLinearSimPOLoss.__init__, ("beta", "gamma")) == functional
    pytest.importorskip("trl")
    with warnings.catch_warnings():  # TRL 1.16 keeps CPO under trl.experimental (and warns so)
        warnings.simplefilter("ignore")
        from trl.experimental.cpo import CPOConfig

    fields = CPOConfig.__dataclass_fields__
    assert (fields["beta"].default, fields["simpo_gamma"].default) == (functional["beta"], functional["gamma"])


def test_trl_metric_names_live_in_one_place(tok) -> None:
    import fastdpo.integrations.trl as trl_integration

    assert set(REWARD_METRICS) | set(TOKEN_METRICS) <= set(TRL_METRIC_ORDER)
    x = _pairs()
    _, metrics = preference_loss(x["pc"], x["pr"], x["rc"], x["rr"])
    assert tuple(metrics) == REWARD_METRICS
    engine = DPOEngine(make_model("llama", tok, seed=0), make_model("llama", tok, seed=1))
    with torch.no_grad():
        _, metrics = engine.step(PreferenceCollator(tok)(preference_rows(2, seed=1)))
    assert tuple(metrics) == REWARD_METRICS + TOKEN_METRICS
    assert trl_integration.TRL_METRIC_ORDER is TRL_METRIC_ORDER


def test_importing_the_losses_stays_cheap() -> None:
    code = (
        "import sys, fastdpo, fastdpo.losses; "
        "print(sorted(m for m in ('transformers', 'trl', 'fastdpo.engine', 'fastdpo.nn') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
