"""The engine and FastDPOTrainer in half precision: a bf16 / fp16 model, an fp32 model under ``torch.autocast``, and
TRL's default ``DPOConfig(bf16=True)`` mixed precision next to TRL's ``DPOTrainer`` in the same setup.

Every tolerance is derived from the naive same-dtype error against float64 (the suite's rule), never a constant:

* per-sequence log-probs: ``|engine - f64| <= |naive - f64| + 2e-6 * scale``, the naive path being the model's own
  full-logits forward in the same dtype / autocast, ``log_softmax`` and a gather (same packing, same attention
  kwargs), the oracle the same model in float64;
* the loss: the sigmoid DPO formula (LOSSES.md) of the float64 log-probs, within the first-order propagation of the
  naive log-prob error (``|d loss| <= beta * max |d margin| <= 2 * beta * (err_policy + err_reference)``);
* parameter gradients (the backbone's own half-precision backward dominates them): ``|engine - f64| <= |naive - f64|
  + 2 * u * scale``, ``u`` the dtype's unit roundoff (``eps / 2``), for the two roundings where the engine hands the
  backbone an fp32-accumulated head gradient;
* trainers over 3 optimizer steps: every logged metric of FastDPOTrainer within 3x TRL's own bf16 deviation from the
  fp32 run with the same (bf16-representable) initial weights: two bf16 runs are two samples of the same rounding
  noise, whose ratio reached 2.0 on one metric-step here.

Under autocast (and the trainers' mixed precision, which autocasts only the model's forward) the fused head must run
in the autocast dtype like the model's ``nn.Linear`` head would (``fastdpo.engine_inputs.head_operands``): checked by
watching the head's operands.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from helpers import dpo_config

import fastdpo.head.function as head_function
import fastdpo.head.grad_in_forward as head_grad_in_forward
from fastdpo import DPOEngine, PreferenceCollator
from fastdpo.reference import naive_batch_logps, naive_dpo_loss
from fastdpo.tiny import make_model, make_tokenizer, preference_rows

pytestmark = pytest.mark.usefixtures("one_thread")

BETA = 0.1
PAIRS = 4
#: mode -> (model dtype, autocast dtype)
MODES = {
    "bf16": (torch.bfloat16, None),
    "fp16": (torch.float16, None),
    "autocast-bf16": (torch.float32, torch.bfloat16),
    "autocast-fp16": (torch.float32, torch.float16),
}


def _autocast(dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """CPU autocast (the CUDA case runs a bf16 model, no autocast)."""
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.double().cpu() for n, p in model.named_parameters() if p.grad is not None}


@contextlib.contextmanager
def _watch_head(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[torch.dtype, ...]]]:
    """Record ``(hidden, weight, autocast on)`` dtypes/state of every fused-head call the engine makes."""
    seen: list[tuple[Any, ...]] = []
    for module, name in (
        (head_function, "linear_token_logprobs"),
        (head_grad_in_forward, "linear_logprobs_loss_grad_in_forward"),
    ):
        original = getattr(module, name)

        def spy(
            hidden: torch.Tensor, weight: torch.Tensor, *args: Any, _original: Any = original, **kwargs: Any
        ) -> Any:
            seen.append((hidden.dtype, weight.dtype, torch.is_autocast_enabled(hidden.device.type)))
            return _original(hidden, weight, *args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    yield seen


@pytest.fixture(scope="module")
def tok() -> Any:
    return make_tokenizer()


@pytest.mark.parametrize("packing", ["pad", "padding_free", "prefix_shared"])
@pytest.mark.parametrize("grad_in_forward", [False, True], ids=["recompute", "grad_in_forward"])
@pytest.mark.parametrize("mode", list(MODES))
def test_engine_step_half_precision_vs_float64(
    tok: Any, monkeypatch: pytest.MonkeyPatch, mode: str, grad_in_forward: bool, packing: str
) -> None:
    model_dtype, autocast = MODES[mode]
    _check_engine_half(tok, monkeypatch, torch.device("cpu"), "eager", model_dtype, autocast, grad_in_forward, packing)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "attn,packing",
    [("sdpa", "pad"), ("sdpa", "padding_free"), ("sdpa", "prefix_shared"), ("flash_attention_2", "padding_free")],
)
@pytest.mark.parametrize("grad_in_forward", [False, True], ids=["recompute", "grad_in_forward"])
def test_engine_step_cuda_bf16_vs_float64(
    tok: Any, monkeypatch: pytest.MonkeyPatch, attn: str, packing: str, grad_in_forward: bool
) -> None:
    """The first GPU step: a bf16 model on CUDA, the batch on CUDA, compiled Triton head (``backend="auto"``), every
    packing with sdpa and flash-attention varlen padding-free (issue 19.1), against the CPU float64 oracle."""
    if attn.startswith("flash"):
        pytest.importorskip("flash_attn")
    _check_engine_half(tok, monkeypatch, torch.device("cuda"), attn, torch.bfloat16, None, grad_in_forward, packing)


def _check_engine_half(
    tok: Any,
    monkeypatch: pytest.MonkeyPatch,
    device: torch.device,
    attn: str,
    model_dtype: torch.dtype,
    autocast: torch.dtype | None,
    grad_in_forward: bool,
    packing: str,
) -> None:
    """Engine step + backward on ``device`` against the float64 oracle (CPU, eager attention), within the naive
    same-precision path's error (see the module docstring)."""
    half = autocast or model_dtype
    policy = make_model("llama", tok, attn_implementation=attn, seed=0).to(device, model_dtype).train()
    ref = make_model("llama", tok, attn_implementation=attn, seed=1).to(device, model_dtype)
    cpu_batch = PreferenceCollator(tok, packing=packing)(preference_rows(PAIRS, seed=5))
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in cpu_batch.items()}

    # float64 oracle (the same weights, exactly; CPU, eager attention) and the naive path in the same precision
    pol64, ref64 = (copy.deepcopy(m).to("cpu", torch.float64) for m in (policy, ref))
    for m in (pol64, ref64):
        m.config._attn_implementation = "eager"
    o_pol, o_ref = naive_batch_logps(pol64, cpu_batch), naive_batch_logps(ref64, cpu_batch).detach()
    o_loss = naive_dpo_loss(o_pol, o_ref, BETA)
    o_loss.backward()
    g64 = _grads(pol64)
    naive_policy = copy.deepcopy(policy)
    with _autocast(autocast):
        n_pol, n_ref = naive_batch_logps(naive_policy, batch), naive_batch_logps(ref, batch).detach()
    naive_dpo_loss(n_pol, n_ref, BETA).backward()
    g_naive = _grads(naive_policy)

    engine = DPOEngine(copy.deepcopy(policy), ref, beta=BETA, grad_in_forward=grad_in_forward)
    with _watch_head(monkeypatch) as head_calls, _autocast(autocast):
        e_pol = engine.compute_logps(engine.model, batch, with_grad=False)
        e_ref = engine.reference_logps(batch)
        loss, metrics = engine.step(batch)
    loss.backward()
    # the head ran in the half dtype (under autocast: operands cast, autocast off inside the head)
    assert head_calls and all(c == (half, half, False) for c in head_calls), head_calls

    def err(x: torch.Tensor, ref64_: torch.Tensor) -> float:
        return float((x.detach().double().cpu() - ref64_.detach()).abs().max())

    pol_lp = torch.cat([e_pol["chosen_logps"], e_pol["rejected_logps"]])
    ref_lp = torch.cat(e_ref)
    scale = float(o_pol.detach().abs().max())
    naive_pol_err, naive_ref_err = err(n_pol, o_pol), err(n_ref, o_ref)
    assert err(pol_lp, o_pol) <= naive_pol_err + 2e-6 * scale, (err(pol_lp, o_pol), naive_pol_err)
    assert err(ref_lp, o_ref) <= naive_ref_err + 2e-6 * scale, (err(ref_lp, o_ref), naive_ref_err)
    assert naive_pol_err > 0 and naive_ref_err > 0  # half precision really was used by the naive path

    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss_bound = 2 * BETA * (naive_pol_err + naive_ref_err) + 1e-6
    assert abs(float(loss) - float(o_loss)) <= loss_bound, (float(loss), float(o_loss), loss_bound)
    if not grad_in_forward:  # the step's loss is exactly the formula of the engine's own log-probs
        own = naive_dpo_loss(pol_lp.double().cpu(), ref_lp.double().cpu(), BETA)
        assert float(loss) == pytest.approx(float(own), rel=1e-6)
    assert float(metrics["logps/chosen"]) == pytest.approx(float(o_pol[:PAIRS].detach().mean()), abs=naive_pol_err)

    g_engine = _grads(engine.model)
    assert g_engine.keys() == g64.keys()
    gscale = max(float(g.abs().max()) for g in g64.values())
    unit_roundoff = torch.finfo(half).eps / 2
    gerr = max(float((g_engine[k] - g64[k]).abs().max()) for k in g64)
    naive_gerr = max(float((g_naive[k] - g64[k]).abs().max()) for k in g64)
    assert gerr <= naive_gerr + 2 * unit_roundoff * gscale, (gerr, naive_gerr, gscale)


# ---------------------------------------------------------------------------------------------------------------
# FastDPOTrainer vs TRL DPOTrainer in bf16
# ---------------------------------------------------------------------------------------------------------------

_SKIP_KEYS = {"epoch", "step", "learning_rate"}


def _train(
    trainer_cls: Any, tmp_path: Any, *, model_dtype: torch.dtype = torch.float32, **config: Any
) -> list[dict[str, float]]:
    datasets = pytest.importorskip("datasets")
    tok = make_tokenizer()
    policy = make_model("llama", tok, attn_implementation="eager", seed=0)
    ref = make_model("llama", tok, attn_implementation="eager", seed=1)
    for m in (policy, ref):  # every run starts from the same bf16-representable weights
        m.to(torch.bfloat16).to(model_dtype)
    policy.train()
    args = dpo_config(tmp_path / trainer_cls.__name__, **config)
    trainer = trainer_cls(
        model=policy,
        ref_model=ref,
        args=args,
        processing_class=tok,
        train_dataset=datasets.Dataset.from_list(preference_rows(12, seed=3)),
    )
    torch.manual_seed(1234)  # the train sampler draws from the global generator
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory: Any) -> list[dict[str, float]]:
    pytest.importorskip("trl")
    from trl import DPOTrainer

    return _train(DPOTrainer, tmp_path_factory.mktemp("fp32"))


@pytest.mark.parametrize("setup", ["DPOConfig(bf16=True)", "bf16 model"])
def test_trainer_bf16_matches_trl_within_its_own_bf16_error(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, fp32_run: list[dict[str, float]], setup: str
) -> None:
    from trl import DPOTrainer

    from fastdpo.integrations.trl import FastDPOTrainer

    kw: dict[str, Any] = {"bf16": True} if setup.startswith("DPOConfig") else {"model_dtype": torch.bfloat16}
    trl_bf16 = _train(DPOTrainer, tmp_path, **kw)
    with _watch_head(monkeypatch) as head_calls:
        fast = _train(FastDPOTrainer, tmp_path, **kw)
    # TRL's lm_head runs in bf16 in both setups; so does the fused head (operands bf16, not an fp32 GEMM)
    assert head_calls and all(c[:2] == (torch.bfloat16, torch.bfloat16) for c in head_calls), head_calls
    assert len(fast) == len(trl_bf16) == len(fp32_run) == 3
    keys = [k for k in fp32_run[0] if k not in _SKIP_KEYS]
    assert {"loss", "grad_norm", "rewards/margins", "logps/chosen", "entropy"} <= set(keys)
    moved = False
    for key in keys:
        naive_err = max(abs(t[key] - r[key]) for t, r in zip(trl_bf16, fp32_run))
        moved |= naive_err > 0
        scale = max(abs(r[key]) for r in fp32_run)
        for step, (f, r) in enumerate(zip(fast, fp32_run), start=1):
            assert math.isfinite(f[key]), (step, key)
            bound = 3 * naive_err + 1e-6 * scale
            assert abs(f[key] - r[key]) <= bound, f"step {step} {key}: |{f[key]} - fp32 {r[key]}| > {bound:.3e}"
    assert moved, "TRL's bf16 run equals the fp32 run: the comparison would be vacuous"
