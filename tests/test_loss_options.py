"""The loss options are written once (issue 14): :class:`PreferenceLossConfig` holds their names, types, defaults and
docs; the entry points take ``loss_config=`` or ``**loss_options`` (:class:`LossOptions`) and combine them with
:meth:`PreferenceLossConfig.resolve`. A misspelt option still raises, an option given with a config must agree with
it, the defaults are the config's, and positional use keeps working."""

from __future__ import annotations

import dataclasses
import inspect
import typing

import pytest
import torch

from fastdpo.engine import DPOEngine
from fastdpo.fused_base import FusedHeadKeywords, FusedHeadModule
from fastdpo.losses import LossOptions, PreferenceLossConfig, partial_preference_loss, preference_loss
from fastdpo.losses.paired import PairStatistics
from fastdpo.nn import DPOLoss, FusedDPOKeywords, FusedLinearDPOLoss, PairedHeadKeywords, _FusedLinearPreferenceBase
from fastdpo.ref_cache import CacheExpectations, RefLogpCache
from fastdpo.tiny import make_model, make_tokenizer

FIELDS = [f.name for f in dataclasses.fields(PreferenceLossConfig)]
P = 4


def _args() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(11)
    return tuple(-torch.rand(P, generator=g, dtype=torch.float64) * 10 - 1 for _ in range(4))


@pytest.fixture(scope="module")
def models():
    tok = make_tokenizer()
    return make_model("llama", tok, seed=0), make_model("llama", tok, seed=1)


ENTRY_POINTS = {
    "preference_loss": lambda models, **kw: preference_loss(*_args(), **kw)[0],
    "DPOLoss": lambda models, **kw: DPOLoss(**kw).loss_config,
    "DPOEngine": lambda models, **kw: DPOEngine(*models, **kw).loss_config,
    "FusedLinearDPOLoss": lambda models, **kw: FusedLinearDPOLoss(**kw).loss_config,
}


# ------------------------------------------------------------------------------------------ one definition
def test_loss_options_are_the_config_fields() -> None:
    """The keywords' names and types are the config's fields (the TypedDict only types ``**loss_options``)."""
    hints = typing.get_type_hints(LossOptions)
    assert list(hints) == FIELDS
    assert hints == typing.get_type_hints(PreferenceLossConfig)


@pytest.mark.parametrize("fn", [preference_loss, DPOLoss.__init__, DPOEngine.__init__])
def test_no_entry_point_repeats_an_option_default(fn) -> None:
    """Before, each entry point spelt out the option keywords with their defaults; now the defaults live in the
    config only (DPOLoss keeps ``loss_type`` as its positional-only first parameter, default None = not given)."""
    params = inspect.signature(fn).parameters
    repeated = [n for n, p in params.items() if n in FIELDS and p.kind is not inspect.Parameter.POSITIONAL_ONLY]
    assert not repeated
    assert params["loss_options"].kind is inspect.Parameter.VAR_KEYWORD


def test_head_and_statistics_typed_dicts_match_their_signatures() -> None:
    def keyword_only(fn) -> list[str]:
        return [n for n, p in inspect.signature(fn).parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]

    assert keyword_only(FusedHeadModule.__init__) == list(FusedHeadKeywords.__annotations__)
    extra = [n for n in PairedHeadKeywords.__annotations__ if n not in FusedHeadKeywords.__annotations__]
    assert keyword_only(_FusedLinearPreferenceBase.__init__) == extra
    dpo_extra = set(FusedDPOKeywords.__annotations__) - set(PairedHeadKeywords.__annotations__)
    assert dpo_extra == {"loss_weights", "f_divergence_type", "f_alpha_divergence_coef"} <= set(FIELDS)
    assert list(PairStatistics.__annotations__) == [
        n for n in inspect.signature(preference_loss).parameters if n.endswith(("_lengths", "_sum", "_p2", "_weights"))
    ]
    assert set(CacheExpectations.__annotations__) == {
        "model",
        "model_hash",
        "exclude_adapters",
        "data_hash",
        "batches",
        "settings",
    }


# ------------------------------------------------------------------------------------------ defaults
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_defaults_are_the_config_defaults(models, entry: str) -> None:
    got = ENTRY_POINTS[entry](models)
    if entry == "preference_loss":
        assert torch.equal(got, preference_loss(*_args(), loss_config=PreferenceLossConfig())[0])
    else:
        assert got == PreferenceLossConfig()


def test_liger_positional_defaults_are_the_config_defaults() -> None:
    """FusedLinearDPOLoss keeps Liger's positional loss options with Liger's defaults: they are the config's."""
    params = inspect.signature(FusedLinearDPOLoss.__init__).parameters
    for name in ("beta", "loss_type", "label_smoothing", "discopop_tau"):
        assert params[name].default == getattr(PreferenceLossConfig(), name) or (
            name == "loss_type" and (params[name].default,) == PreferenceLossConfig().loss_type
        )


# ------------------------------------------------------------------------------------------ misspelt options
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_unknown_option_raises_type_error(models, entry: str) -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument 'betta'"):
        ENTRY_POINTS[entry](models, betta=0.2)


def test_unknown_keywords_of_the_other_option_dicts_raise() -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument 'betta'; the loss options are"):
        PreferenceLossConfig.resolve(None, {"betta": 0.2})
    pc, pr, rc, rr = _args()
    lengths = torch.full((P,), 3)
    with pytest.raises(TypeError, match="DPOLoss.forward\\(\\) got an unexpected keyword argument 'chosen_length'"):
        DPOLoss()(pc, pr, rc, rr, chosen_length=lengths)
    with pytest.raises(TypeError, match="DPOLoss.forward\\(\\) got an unexpected keyword argument 'beta'"):
        DPOLoss()(pc, pr, rc, rr, beta=0.3)  # a loss option is fixed at construction
    with pytest.raises(TypeError, match="partial_preference_loss\\(\\) got an unexpected keyword argument"):
        partial_preference_loss(pc, pr, rc, rr, loss_config=PreferenceLossConfig(), num_pairs=P, chosen_length=lengths)
    cache = RefLogpCache(["a"], torch.zeros(1, 2), model_hash="m", settings={})
    with pytest.raises(TypeError, match=r"RefLogpCache\.check\(\) got an unexpected keyword argument 'modle'"):
        cache.check(modle=None)


def test_ref_cache_load_refuses_a_misspelt_check_before_reading(tmp_path) -> None:
    missing = tmp_path / "nope.pt"
    with pytest.raises(TypeError, match=r"RefLogpCache\.load\(\) got an unexpected keyword argument 'setting'"):
        RefLogpCache.load(missing, setting={})


# ------------------------------------------------------------------------------------------ loss_config with options
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_option_conflicting_with_loss_config_raises(models, entry: str) -> None:
    config = PreferenceLossConfig("hinge", beta=0.3)
    with pytest.raises(ValueError, match="beta=0.5 conflicts with loss_config.beta=0.3"):
        ENTRY_POINTS[entry](models, loss_config=config, beta=0.5)
    with pytest.raises(ValueError, match="loss_type='ipo' conflicts with loss_config.loss_type"):
        ENTRY_POINTS[entry](models, loss_config=config, loss_type="ipo")
    # agreeing options are accepted, in any spelling
    got = ENTRY_POINTS[entry](models, loss_config=config, loss_type=["hinge"], beta=0.3)
    if entry != "preference_loss":
        assert got is config


@pytest.mark.parametrize("entry", ["preference_loss", "DPOLoss", "DPOEngine"])
def test_explicit_default_conflicting_with_loss_config_raises(models, entry: str) -> None:
    """An option passed explicitly is compared even when it equals the default: before, ``beta=0.1`` (the default)
    with ``loss_config.beta=0.3`` could not be told from an absent keyword and was silently ignored."""
    with pytest.raises(ValueError, match="beta=0.1 conflicts with loss_config.beta=0.3"):
        ENTRY_POINTS[entry](models, loss_config=PreferenceLossConfig(beta=0.3), beta=0.1)


def test_liger_module_reads_positional_defaults_as_not_given() -> None:
    """Liger's positional options always hold a value, so with ``loss_config`` one at its default is not read."""
    config = PreferenceLossConfig("ipo", beta=0.3)
    assert FusedLinearDPOLoss(beta=0.1, loss_config=config).loss_config is config
    assert FusedLinearDPOLoss(loss_config=config).beta == 0.3


# ------------------------------------------------------------------------------------------ positional use
def test_positional_use_keeps_working() -> None:
    assert DPOLoss("ipo", beta=0.2).loss_config == PreferenceLossConfig("ipo", beta=0.2)
    assert DPOLoss(["sigmoid", "hinge"], loss_weights=[1, 2]).loss_types == ("sigmoid", "hinge")
    assert DPOLoss(loss_type="ipo").loss_config == DPOLoss("ipo").loss_config
    with pytest.raises(TypeError, match="multiple values for argument 'loss_type'"):
        DPOLoss("ipo", loss_type="hinge")
    with pytest.raises(ValueError, match="conflicts"):
        DPOLoss("hinge", loss_config=PreferenceLossConfig("ipo"))
    liger = FusedLinearDPOLoss(-100, 0.2, 1.0, False, True, True, False, 1, "robust", 0.1, 0.05)
    assert liger.loss_config == PreferenceLossConfig("robust", beta=0.2, label_smoothing=0.1)
    assert liger.loss_type == "robust" and liger.beta == 0.2
    assert PreferenceLossConfig(["sigmoid", "ipo"], [1, 2], 0.2).loss_weights == (1.0, 2.0)


def test_options_and_config_give_the_same_loss() -> None:
    kw = dict(loss_type=["sigmoid", "ipo"], loss_weights=[0.6, 0.4], beta=0.2)
    args, lengths = _args(), dict(chosen_lengths=torch.full((P,), 3), rejected_lengths=torch.full((P,), 5))
    by_kw, _ = preference_loss(*args, **kw, **lengths)
    by_cfg, _ = preference_loss(*args, loss_config=PreferenceLossConfig(**kw), **lengths)
    module, _ = DPOLoss(kw.pop("loss_type"), **kw)(*args, **lengths)
    assert torch.equal(by_kw, by_cfg) and torch.equal(module, by_kw)


def test_modules_and_engine_read_their_options_from_the_one_config(models) -> None:
    """``DPOLoss`` and ``DPOEngine`` expose the configuration's fields as read-only attributes over ``loss_config``
    (one source of truth: no copy can drift from what the loss uses)."""
    config = PreferenceLossConfig(["exo_pair", "sft"], [1.0, 0.5], beta=0.3, label_smoothing=0.2)
    loss = DPOLoss(loss_config=config)
    fields = {
        "loss_types": config.loss_type,
        "loss_weights": config.loss_weights,
        "beta": 0.3,
        "label_smoothing": 0.2,
        "f_divergence_type": config.f_divergence_type,
        "f_alpha_divergence_coef": config.f_alpha_divergence_coef,
        "discopop_tau": config.discopop_tau,
        "use_weighting": False,
    }
    assert {name: getattr(loss, name) for name in fields} == fields
    policy, ref = models
    engine = DPOEngine(policy, ref, loss_config=config.replace(ld_alpha=0.5))
    engine_fields = {"loss_types": config.loss_type, "loss_weights": config.loss_weights, "beta": 0.3}
    assert {name: getattr(engine, name) for name in engine_fields} == engine_fields
    assert engine.use_weighting is False and engine.ld_alpha == 0.5
    for owner in (loss, engine):
        with pytest.raises(AttributeError):
            owner.beta = 1.0
