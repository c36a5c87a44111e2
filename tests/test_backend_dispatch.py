"""``backend="auto"`` and the ``FASTDPO_BACKEND`` override: resolution per device, the environment read at every call,
bad values refused with a message naming the variable, and the override reaching the kernels through every public
entry point (spied at the launch helpers) and through ``DPOEngine``."""

from __future__ import annotations

import pytest
import torch

import fastdpo.head.sweeps as head_sweeps_module
import fastdpo.logprobs as logprobs_module
import fastdpo.segments as segments_module
from fastdpo import DPOEngine, PreferenceCollator, linear_token_logprobs, sequence_logprobs
from fastdpo._dispatch import resolve_backend, triton_available
from fastdpo.segments import segment_sum
from fastdpo.tiny import make_model, make_tokenizer, preference_rows

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
needs_triton = pytest.mark.skipif(not triton_available(), reason="needs triton")


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv("FASTDPO_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return monkeypatch


def test_auto_picks_torch_on_cpu_and_triton_on_cuda(env: pytest.MonkeyPatch) -> None:
    # the interpreter (on here) does not make "auto" pick Triton for CPU tensors: it is a test device, not a fast path
    assert resolve_backend("auto", CPU) == "torch"
    assert resolve_backend("auto", torch.device("meta")) == "torch"
    assert resolve_backend("auto", CUDA) == ("triton" if triton_available() else "torch")
    assert resolve_backend("torch", CUDA) == "torch"
    env.setenv("TRITON_INTERPRET", "0")
    assert resolve_backend("auto", CPU) == "torch"
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors or TRITON_INTERPRET=1"):
        resolve_backend("triton", CPU)


@needs_triton
@pytest.mark.parametrize(
    "value,device,expected",
    [
        ("torch", CUDA, "torch"),
        ("auto", CUDA, "triton"),
        ("", CPU, "torch"),
        ("", CUDA, "triton"),
        ("triton", CPU, "triton"),
        ("auto", CPU, "torch"),
    ],
)
def test_env_overrides_auto_only(env: pytest.MonkeyPatch, value: str, device: torch.device, expected: str) -> None:
    env.setenv("FASTDPO_BACKEND", value)
    assert resolve_backend("auto", device) == expected
    assert resolve_backend("torch", device) == "torch"  # an explicit backend wins over the environment


@pytest.mark.parametrize("value", ["cuda", "Triton", "TORCH", " torch", "none", "1"])
def test_bad_env_value_is_a_clear_error(env: pytest.MonkeyPatch, value: str) -> None:
    env.setenv("FASTDPO_BACKEND", value)
    with pytest.raises(ValueError, match=r"FASTDPO_BACKEND must be 'auto', 'triton' or 'torch'.*" + repr(value)[1:-1]):
        resolve_backend("auto", CPU)
    # every entry point refuses before computing anything, and explicit backends ignore the variable
    logits, labels = torch.randn(2, 3, 11), torch.randint(0, 11, (2, 3))
    with pytest.raises(ValueError, match="FASTDPO_BACKEND"):
        sequence_logprobs(logits, labels)
    with pytest.raises(ValueError, match="FASTDPO_BACKEND"):
        linear_token_logprobs(torch.randn(5, 4), torch.randn(11, 4), torch.randint(0, 11, (5,)))
    with pytest.raises(ValueError, match="FASTDPO_BACKEND"):
        segment_sum(torch.randn(5), torch.tensor([0, 0, 1, 2, 2]), 3)
    assert sequence_logprobs(logits, labels, backend="torch").shape == (2,)


@needs_triton
def test_env_triton_without_the_interpreter_names_the_variable(env: pytest.MonkeyPatch) -> None:
    env.setenv("FASTDPO_BACKEND", "triton")
    env.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="FASTDPO_BACKEND=triton needs CUDA tensors or TRITON_INTERPRET=1"):
        sequence_logprobs(torch.randn(2, 3, 11), torch.randint(0, 11, (2, 3)))


def _count_calls(monkeypatch: pytest.MonkeyPatch, module: object, names: tuple[str, ...]) -> dict[str, int]:
    counts = dict.fromkeys(names, 0)
    for name in names:
        original = getattr(module, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return counts


@needs_triton
@pytest.mark.parametrize("value", ["triton", "torch"])
def test_env_reaches_the_kernels(env: pytest.MonkeyPatch, value: str) -> None:
    """``backend="auto"`` (the default) under ``FASTDPO_BACKEND``: the Triton launch helpers run exactly when the
    variable says triton -- the log-prob kernel, the head's fold kernel, the segment-sum kernel."""
    env.setenv("FASTDPO_BACKEND", value)
    lp = _count_calls(env, logprobs_module, ("_triton_forward", "_torch_forward"))
    head = _count_calls(env, head_sweeps_module, ("_fold_tile_triton",))
    seg = _count_calls(env, segments_module, ("_segment_sum_triton",))
    g = torch.Generator().manual_seed(0)
    sequence_logprobs(torch.randn(2, 3, 37, generator=g), torch.randint(0, 37, (2, 3), generator=g))
    linear_token_logprobs(
        torch.randn(5, 8, generator=g), torch.randn(37, 8, generator=g), torch.randint(0, 37, (5,), generator=g)
    )
    segment_sum(torch.randn(6, generator=g), torch.tensor([0, 1, 1, 2, 0, 2]), 3)
    triton = value == "triton"
    assert lp == {"_triton_forward": int(triton), "_torch_forward": int(not triton)}
    assert (head["_fold_tile_triton"] > 0) == triton
    assert seg["_segment_sum_triton"] == int(triton)


@needs_triton
def test_env_reaches_the_engine(env: pytest.MonkeyPatch) -> None:
    """A default ``DPOEngine`` (``backend="auto"``) follows ``FASTDPO_BACKEND`` at step time, with the same loss."""
    tok = make_tokenizer()
    policy = make_model("llama", tok, attn_implementation="eager", seed=0)
    ref = make_model("llama", tok, attn_implementation="eager", seed=1)
    batch = PreferenceCollator(tok, packing="padding_free")(preference_rows(2, seed=1))
    engine = DPOEngine(policy, ref)
    head = _count_calls(env, head_sweeps_module, ("_fold_tile_triton",))
    loss_torch, _ = engine.step(batch)
    assert head["_fold_tile_triton"] == 0
    env.setenv("FASTDPO_BACKEND", "triton")
    loss_triton, _ = engine.step(batch)
    assert head["_fold_tile_triton"] > 0
    assert float(loss_triton) == pytest.approx(float(loss_torch), rel=1e-5)
