"""The fused head's package layout and option names (issue 14): the old import path, the tile / budget keywords and
their deprecated spellings, and tiles that reach every mode (grad-in-forward included) instead of being dropped.

The tiles a call actually uses are observed by wrapping the head's forward sweep and reading its ``_Spec``."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import fastdpo.head as head
import fastdpo.head.function as head_function
import fastdpo.head.grad_in_forward as head_gif
import fastdpo.reference as reference
from fastdpo import DPOEngine, PreferenceCollator
from fastdpo.fused_kto import FusedLinearKTOLoss
from fastdpo.nn import FusedLinearDPOLoss
from fastdpo.tiny import make_model, make_tokenizer, preference_rows

pytestmark = pytest.mark.usefixtures("one_thread")

N, D, V = 23, 8, 97


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g, requires_grad=True)
    weight = torch.randn(V, D, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[3] = -100
    return hidden, weight, labels


def _spy(monkeypatch: pytest.MonkeyPatch, module: Any) -> list[tuple[int, int, int | None]]:
    """``(token tile, vocab tile, kept-logits budget)`` of every forward sweep that ``module`` runs."""
    seen: list[tuple[int, int, int | None]] = []
    original = module._forward_sweep

    def sweep(h, w, b, labels, spec, stats, argmax, kept):  # noqa: ANN001, ANN202
        seen.append((spec.token_chunk, spec.vocab_chunk, None if kept is None else kept.budget))
        return original(h, w, b, labels, spec, stats, argmax, kept)

    monkeypatch.setattr(module, "_forward_sweep", sweep)
    return seen


@pytest.fixture
def no_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        yield


# ------------------------------------------------------------------------------------------------ import paths


def test_old_import_path_reexports_the_public_names_only() -> None:
    import fastdpo.linear_logprobs as old

    assert set(old.__all__) <= set(head.__all__)
    for name in old.__all__:
        assert getattr(old, name) is getattr(head, name), name
    for private in ("_plan", "_forward_sweep", "_mm_acc", "_Spec", "_GatherDTensor"):
        assert not hasattr(old, private), private
    import fastdpo

    assert fastdpo.linear_token_logprobs is head.linear_token_logprobs


# ------------------------------------------------------------------------------------------------ head functions


def test_tiles_reach_the_sweep(monkeypatch: pytest.MonkeyPatch, no_warnings: None) -> None:
    seen = _spy(monkeypatch, head_function)
    hidden, weight, labels = _inputs()
    head.linear_token_logprobs(hidden, weight, labels, token_tile=5, vocab_tile=16, backend="torch")
    head.linear_token_logprobs(hidden, weight, labels, vocab_tile=16, backend="torch")
    head.linear_token_logprobs(hidden, weight, labels, token_tile=5, backend="torch")
    head.linear_sequence_logprobs(hidden[None], weight, labels[None], token_tile=3, vocab_tile=40, backend="torch")
    n = N - 1  # one ignored position is compacted away
    assert [s[:2] for s in seen] == [(5, 16), (n, 16), (5, V), (3, 40)]


@pytest.mark.parametrize(
    "chunk_size, tiles", [(16, {"vocab_tile": 16}), ((5, 16), {"token_tile": 5, "vocab_tile": 16})]
)
def test_chunk_size_is_the_deprecated_spelling_of_the_tiles(
    monkeypatch: pytest.MonkeyPatch, chunk_size: Any, tiles: dict[str, int]
) -> None:
    seen = _spy(monkeypatch, head_function)
    hidden, weight, labels = _inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        new = head.linear_token_logprobs(hidden, weight, labels, backend="torch", **tiles).logprobs
    with pytest.warns(DeprecationWarning, match="linear_token_logprobs: chunk_size= is deprecated, use vocab_tile="):
        old = head.linear_token_logprobs(hidden, weight, labels, backend="torch", chunk_size=chunk_size).logprobs
    assert seen[0] == seen[1]
    torch.testing.assert_close(old, new, rtol=0, atol=0)
    with pytest.warns(DeprecationWarning, match="linear_sequence_logprobs"):
        seq = head.linear_sequence_logprobs(hidden[None], weight, labels[None], chunk_size=chunk_size, backend="torch")
    assert seen[2] == seen[0]
    torch.testing.assert_close(seq, new.sum()[None], rtol=1e-6, atol=1e-6)
    with pytest.warns(DeprecationWarning, match="naive_linear_token_logprobs"):
        reference.naive_linear_token_logprobs(hidden, weight, labels, chunk_size=chunk_size)


def test_chunk_size_with_a_tile_or_bad_tiles_raise() -> None:
    hidden, weight, labels = _inputs()
    with pytest.raises(TypeError, match="deprecated spelling"):
        head.linear_token_logprobs(hidden, weight, labels, chunk_size=16, vocab_tile=16)
    with pytest.raises(ValueError, match="vocab_tile must be >= 1"):
        head.linear_token_logprobs(hidden, weight, labels, vocab_tile=0)
    with pytest.raises(TypeError, match="token_tile must be an int"):
        head.linear_sequence_logprobs(hidden[None], weight, labels[None], token_tile=(4, 8))


def _gif(**kwargs: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hidden, weight, labels = _inputs(1)
    seg = torch.arange(N) % 4
    groups = [torch.tensor([0, 2]), torch.tensor([1, 3])]
    loss, seq = head.linear_logprobs_loss_grad_in_forward(
        hidden, weight, labels, seg, 4, lambda s, ids: (s * s).sum(), groups=groups, backend="torch", **kwargs
    )
    loss.backward()
    return loss.detach(), seq, weight.grad


def test_grad_in_forward_honours_tiles_and_budget(monkeypatch: pytest.MonkeyPatch, no_warnings: None) -> None:
    seen = _spy(monkeypatch, head_gif)
    default = _gif()
    tiled = _gif(token_tile=4, vocab_tile=16, keep_logits_bytes=0, chunk_tokens=7)
    assert seen[0][2] > 0 and seen[0][1] == V
    assert len(seen) > 1 and all(s[0] <= 4 and s[1] == 16 and s[2] == 0 for s in seen[1:])
    for a, b in zip(default, tiled, strict=True):  # the same sums in another tile order: fp32 rounding apart
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, b.abs().max().item()))


def test_grad_in_forward_deprecated_names(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _spy(monkeypatch, head_gif)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        new = _gif(chunk_tokens=7, keep_logits_bytes=64)
    n_new = len(seen)
    with pytest.warns(DeprecationWarning) as record:
        old = _gif(chunk_size=7, logits_budget_bytes=64)
    messages = sorted(str(w.message) for w in record)
    assert messages == [
        "linear_logprobs_loss_grad_in_forward: chunk_size= is deprecated, use chunk_tokens=",
        "linear_logprobs_loss_grad_in_forward: logits_budget_bytes= is deprecated, use keep_logits_bytes=",
    ]
    assert seen[n_new:] == seen[:n_new]
    for a, b in zip(new, old, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(TypeError, match="deprecated name of chunk_tokens"):
        _gif(chunk_size=7, chunk_tokens=7)
    with pytest.raises(ValueError, match="keep_logits_bytes must be an int >= 0"):
        _gif(keep_logits_bytes=-1)


# ------------------------------------------------------------------------------------------------ engine, modules


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any, Any, dict[str, Any]]:
    tok = make_tokenizer()
    policy = make_model("llama", tok, attn_implementation="eager", seed=0)
    ref = make_model("llama", tok, attn_implementation="eager", seed=1)
    batch = PreferenceCollator(tok, packing="padding_free")(preference_rows(2, seed=1))
    return tok, policy, ref, batch


@pytest.mark.parametrize("grad_in_forward", [False, True])
def test_engine_tiles_reach_both_modes(monkeypatch: pytest.MonkeyPatch, tiny: Any, grad_in_forward: bool) -> None:
    _, policy, ref, batch = tiny
    seen = _spy(monkeypatch, head_gif if grad_in_forward else head_function)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        DPOEngine(policy, ref, grad_in_forward=grad_in_forward, token_tile=3, vocab_tile=16).step(batch)
    policy_sweeps = seen[:]  # grad-in-forward spies the policy's sweeps only
    assert policy_sweeps and all(s[0] <= 3 and s[1] == 16 for s in policy_sweeps)
    seen.clear()
    with pytest.warns(DeprecationWarning, match="DPOEngine: chunk_size= is deprecated"):
        engine = DPOEngine(policy, ref, grad_in_forward=grad_in_forward, chunk_size=16)
    engine.step(batch)
    assert seen and all(s[1] == 16 for s in seen)


def test_engine_refuses_bad_tiles(tiny: Any) -> None:
    _, policy, ref, _ = tiny
    with pytest.raises(ValueError, match="vocab_tile must be >= 1"):
        DPOEngine(policy, ref, vocab_tile=0)
    with pytest.raises(TypeError, match="deprecated spelling"):
        DPOEngine(policy, ref, chunk_size=16, token_tile=4)


def _dpo_inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 5, D, generator=g, requires_grad=True)
    w = torch.randn(V, D, generator=g, requires_grad=True)
    target = torch.randint(0, V, (4, 5), generator=g)
    target[:, :2] = -100
    xr, wr = torch.randn(4, 5, D, generator=g), torch.randn(V, D, generator=g)
    return w, x, target, None, xr, wr, None


@pytest.mark.parametrize("grad_in_forward", [False, True])
def test_nn_module_tiles_and_budget_reach_the_head(monkeypatch: pytest.MonkeyPatch, grad_in_forward: bool) -> None:
    seen = _spy(monkeypatch, head_gif if grad_in_forward else head_function)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        module = FusedLinearDPOLoss(grad_in_forward=grad_in_forward, token_tile=4, vocab_tile=16, keep_logits_bytes=0)
    loss, _ = module(*_dpo_inputs())
    loss.backward()
    assert seen and all(s[0] <= 4 and s[1] == 16 for s in seen)
    if grad_in_forward:
        assert all(s[2] == 0 for s in seen)
    seen.clear()
    with pytest.warns(DeprecationWarning, match="FusedLinearDPOLoss: head_chunk_size= is deprecated") as record:
        module = FusedLinearDPOLoss(grad_in_forward=grad_in_forward, head_chunk_size=(4, 16))
    assert record[0].filename == __file__  # the warning points at the caller's line
    module(*_dpo_inputs())[0].backward()
    assert seen and all(s[0] <= 4 and s[1] == 16 for s in seen)


def test_kto_module_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _spy(monkeypatch, head_function)
    w, x, target, *_ = _dpo_inputs()
    labels = torch.tensor([True, False, True, False])
    with pytest.warns(DeprecationWarning, match="FusedLinearKTOLoss: head_chunk_size= is deprecated"):
        FusedLinearKTOLoss(head_chunk_size=16)(x, w, target, None, labels)
    FusedLinearKTOLoss(token_tile=4, vocab_tile=16)(x, w, target, None, labels)
    assert len(seen) == 2 and seen[0][1] == 16 and seen[1][:2] == (4, 16)
    with pytest.raises(ValueError, match="token_tile must be >= 1"):
        FusedLinearKTOLoss(token_tile=0)
