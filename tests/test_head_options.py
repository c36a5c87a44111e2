"""The head's and the log-prob op's options are read once (issue 14): ``linear_sequence_logprobs``, grad-in-forward,
the naive oracle and ``sequence_logprobs`` take the keywords of their token function as ``**options``. Every keyword
they accepted before keeps working (with the same result as leaving it out at its default), a keyword they never
accepted is a ``TypeError`` naming the function, and ``inspect.signature`` still shows each keyword of the head's
public functions."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch

from fastdpo.head import linear_logprobs_loss_grad_in_forward, linear_sequence_logprobs, linear_token_logprobs
from fastdpo.head.options import HeadOptions
from fastdpo.logprobs import sequence_logprobs, token_logprobs
from fastdpo.reference import naive_linear_token_logprobs

pytestmark = pytest.mark.usefixtures("one_thread")

N, D, V = 9, 6, 37

# every keyword of each function before the options object, at its default value
HEAD_DEFAULTS: dict[str, Any] = {
    "ignore_index": -100,
    "softcap": None,
    "logit_scale": 1.0,
    "temperature": 1.0,
    "token_tile": None,
    "vocab_tile": None,
    "validate": True,
    "backend": "auto",
    "gather_context": None,
    "keep_logits_bytes": None,
}
RETURNS = {"return_entropy": False, "return_log_sum_p2": False, "return_mean_logit": False, "return_argmax_hit": False}
TOKEN_DEFAULTS = {
    "ignore_index": -100,
    "inplace_backward": False,
    "validate": True,
    "backend": "auto",
    "block_v": None,
    "chunk_rows": None,
}


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(N, D, generator=g)
    weight = torch.randn(V, D, generator=g)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[2] = -100
    return hidden, weight, labels


def _head_calls() -> dict[str, Any]:
    """Each head function on fixed inputs, ``**kw`` passed through; returns one tensor."""
    hidden, weight, labels = _inputs()
    seg = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])

    def gif(**kw: Any) -> torch.Tensor:
        return linear_logprobs_loss_grad_in_forward(hidden, weight, labels, seg, 3, lambda s, i: s.sum(), **kw)[1]

    return {
        "linear_token_logprobs": lambda **kw: linear_token_logprobs(hidden, weight, labels, **kw).logprobs,
        "linear_sequence_logprobs": lambda **kw: linear_sequence_logprobs(
            hidden, weight, labels, segment_ids=seg, num_segments=3, **kw
        ),
        "linear_logprobs_loss_grad_in_forward": gif,
        "naive_linear_token_logprobs": lambda **kw: naive_linear_token_logprobs(hidden, weight, labels, **kw).logprobs,
    }


@pytest.mark.parametrize("name", list(_head_calls()))
def test_head_functions_accept_every_keyword_they_accepted(name: str) -> None:
    call = _head_calls()[name]
    keywords = dict(HEAD_DEFAULTS, **(RETURNS if "token" in name else {}))
    torch.testing.assert_close(call(**keywords), call(), rtol=0, atol=0)
    changed = call(logit_scale=2.0, softcap=3.0, temperature=0.7, token_tile=4, vocab_tile=16)
    assert not torch.equal(changed, call())  # the options reach the computation
    with pytest.raises(TypeError, match=rf"{name}\(\) got an unexpected keyword argument 'softcapp'"):
        call(softcapp=3.0)


def test_only_the_token_functions_take_the_return_flags() -> None:
    calls = _head_calls()
    for name in ("linear_sequence_logprobs", "linear_logprobs_loss_grad_in_forward"):
        with pytest.raises(TypeError, match="unexpected keyword argument 'return_entropy'"):
            calls[name](return_entropy=True)
    naive = calls["naive_linear_token_logprobs"]
    hidden, weight, labels = _inputs()
    stats = naive_linear_token_logprobs(hidden, weight, labels, return_entropy=True, return_argmax_hit=True)
    assert stats.entropy is not None and stats.argmax_hit is not None and stats.log_sum_p2 is None
    assert naive().shape == labels.shape


@pytest.mark.parametrize("fn", [linear_token_logprobs, linear_sequence_logprobs, linear_logprobs_loss_grad_in_forward])
def test_signatures_show_every_head_keyword(fn: Any) -> None:
    params = inspect.signature(fn).parameters
    for name, default in HEAD_DEFAULTS.items():
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY and params[name].default == default, name
    assert "chunk_size" in params
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


@pytest.mark.parametrize(
    ("keywords", "error", "match"),
    [
        ({"softcap": 0.0}, ValueError, "softcap must be a finite number > 0"),
        ({"logit_scale": None}, TypeError, "logit_scale must be a number"),
        ({"temperature": float("inf")}, ValueError, "temperature must be a finite number > 0"),
        ({"ignore_index": True}, TypeError, "ignore_index must be an int"),
        ({"vocab_tile": 0}, ValueError, "vocab_tile must be >= 1"),
        ({"token_tile": 2.5}, TypeError, "token_tile must be an int or None"),
        ({"gather_context": 5}, TypeError, "gather_context must be a callable"),
        ({"keep_logits_bytes": -1}, ValueError, "keep_logits_bytes must be an int >= 0"),
    ],
)
def test_head_options_check_themselves(keywords: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        HeadOptions(**keywords)
    for call in _head_calls().values():
        with pytest.raises(error, match=match):
            call(**keywords)


def test_sequence_logprobs_takes_the_token_keywords() -> None:
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 5, V, generator=g)
    labels = torch.randint(0, V, (2, 5), generator=g)
    labels[0, :2] = -100
    plain = sequence_logprobs(logits, labels)
    torch.testing.assert_close(sequence_logprobs(logits, labels, **TOKEN_DEFAULTS), plain, rtol=0, atol=0)
    torch.testing.assert_close(plain, token_logprobs(logits, labels, **TOKEN_DEFAULTS).sum(1), rtol=1e-6, atol=1e-6)
    moved = labels.masked_fill(labels == -100, 7)
    ignored = sequence_logprobs(logits, torch.where(labels == -100, -1, labels), ignore_index=-1)
    torch.testing.assert_close(ignored, plain, rtol=0, atol=0)
    assert not torch.equal(sequence_logprobs(logits, moved, ignore_index=-1), plain)
    with pytest.raises(TypeError, match=r"sequence_logprobs\(\) got an unexpected keyword argument 'block'"):
        sequence_logprobs(logits, labels, block=16)


def test_typed_keywords_name_exactly_the_options() -> None:
    """The ``TypedDict`` s that type the ``**options`` (PEP 692 ``Unpack``) name exactly the keywords each function
    reads: the options objects' fields, plus ``chunk_size`` and the ``return_*`` flags where the function takes them."""
    import dataclasses
    import typing

    from fastdpo.head.options import HeadKeywords, HeadOptionKeywords, TokenStatsKeywords
    from fastdpo.logprobs import TokenLogprobsKeywords, _Options

    fields = {f.name for f in dataclasses.fields(HeadOptions)}
    assert set(typing.get_type_hints(HeadOptionKeywords)) == fields == set(HEAD_DEFAULTS)
    assert set(typing.get_type_hints(HeadKeywords)) == fields | {"chunk_size"}
    assert set(typing.get_type_hints(TokenStatsKeywords)) == fields | {"chunk_size"} | set(RETURNS)
    assert set(typing.get_type_hints(TokenLogprobsKeywords)) == set(_Options._fields) == set(TOKEN_DEFAULTS)
    # each function's ``**options`` is annotated with its TypedDict
    for fn, typed in [
        (linear_token_logprobs, "HeadKeywords"),
        (linear_sequence_logprobs, "HeadKeywords"),
        (linear_logprobs_loss_grad_in_forward, "HeadOptionKeywords"),
        (naive_linear_token_logprobs, "TokenStatsKeywords"),
        (sequence_logprobs, "TokenLogprobsKeywords"),
    ]:
        code = fn.__code__  # the real ``**`` parameter (the head's ``__signature__`` lists the keywords instead)
        assert code.co_flags & inspect.CO_VARKEYWORDS, fn.__name__
        var_keyword = code.co_varnames[code.co_argcount + code.co_kwonlyargcount]
        assert fn.__annotations__[var_keyword] == f"Unpack[{typed}]", fn.__name__


@pytest.mark.parametrize("fn", [linear_token_logprobs, linear_sequence_logprobs])
def test_nonfinite_warning_points_at_the_callers_line(fn: Any) -> None:
    """The NaN/inf warning of both public head functions names the user's line, not the library's (the check runs
    in their shared ``_token_stats``, one frame deeper than the functions themselves)."""
    import warnings

    hidden = torch.randn(1, 4, D)
    hidden[0, 1, 0] = float("nan")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fn(hidden, torch.randn(V, D), torch.randint(0, V, (1, 4)))
    nonfinite = [w for w in record if "non-finite" in str(w.message)]
    assert len(nonfinite) == 1 and nonfinite[0].category is RuntimeWarning
    assert nonfinite[0].filename == __file__
