"""Input checks run before any kernel launch: bad input becomes a Python exception naming the argument.

Scalars: :func:`check_int` and :func:`check_number` (``bool`` is refused as a number; ``TypeError`` for a wrong type,
``ValueError`` for a wrong value). Tensors: :func:`check_float`, :func:`check_index`, :func:`check_same_device`,
:func:`check_labels`. Keywords of a ``**options`` signature: :func:`check_keywords`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_keywords(where: str, given: Iterable[str], known: Iterable[str], what: str) -> None:
    """``TypeError`` naming ``where`` for a keyword in ``given`` that is not ``known`` (``what`` names the known ones in
    the message), as Python raises for a named parameter: a misspelt keyword is never dropped."""
    known = list(known)
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise TypeError(f"{where} got an unexpected keyword argument {unknown[0]!r}; {what} are {known}")


def check_int(name: str, value: object, *, minimum: int | None = None) -> int:
    """``value`` if it is an ``int`` (not ``bool``) of at least ``minimum``: ``TypeError`` naming ``name`` for another
    type, ``ValueError`` ("must be a positive int" for ``minimum=1``) for a smaller value."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        wanted = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {wanted}, got {value!r}")
    return value


def check_number(name: str, value: object, *, positive: bool = False) -> float:
    """``float(value)`` for a finite ``int``/``float`` (not ``bool``), ``> 0`` if ``positive``: ``TypeError`` naming
    ``name`` for another type, ``ValueError`` for NaN, an infinity or (``positive``) a value ``<= 0``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name} must be a finite number{' > 0' if positive else ''}, got {value}")
    return value


def check_float(name: str, t: torch.Tensor) -> None:
    """Raise ``TypeError`` unless ``t`` is a floating tensor of a supported dtype."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def check_index(name: str, t: torch.Tensor) -> None:
    """Raise ``TypeError`` unless ``t`` is an integer tensor."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")


def check_rows_and_target(
    _input: torch.Tensor, lin_weight: torch.Tensor, target: torch.Tensor, rows: str, *, nonempty: bool
) -> None:
    """The Liger-style modules' checks of ``_input [rows, T, D]`` (``rows`` as the message names it; ``nonempty``:
    at least one row), ``lin_weight`` float and ``target [rows, T]`` integer, in that order."""
    check_float("_input", _input)
    check_float("lin_weight", lin_weight)
    check_index("target", target)
    if _input.dim() != 3 or (nonempty and _input.shape[0] == 0):
        raise ValueError(f"_input must be {rows}, got {list(_input.shape)}")
    if target.shape != _input.shape[:2]:
        raise ValueError(
            f"target must have shape {list(_input.shape[:2])} (= _input.shape[:2]), got {list(target.shape)}"
        )


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """Raise ``ValueError`` when the given tensors do not all live on one device, or live on the ``meta`` device.

    Meta tensors carry shapes but no values: every op here reads values (label checks, segment counts, the kernels),
    so they are refused up front instead of failing deep inside.
    """
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {k: v.device for k, v in present.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{k} on {d}" for k, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")
    meta = [k for k, d in devices.items() if d.type == "meta"]
    if meta:
        raise ValueError(
            f"{', '.join(meta)} {'is' if len(meta) == 1 else 'are'} on the meta device (shapes without values); "
            "fastdpo ops need materialized tensors (e.g. model.to_empty(device=...) and load the weights first)"
        )


def check_labels(labels: torch.Tensor, vocab_size: int, ignore_index: int, name: str = "labels") -> None:
    """Raise ``ValueError`` when a label is neither ``ignore_index`` nor in ``[0, vocab_size)``.

    One device sync (a reduction) — pass ``validate=False`` to the public ops to skip it in hot loops.
    """
    check_index(name, labels)
    if labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        value = int(labels[bad].flatten()[0])
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{name}{list(where)} = {value} is out of range: labels must be {ignore_index} (ignore_index) "
            f"or in [0, {vocab_size})"
        )


def warn_nonfinite_output(out: torch.Tensor, source: str, result: str = "log-probs", *, stacklevel: int = 3) -> None:
    """Warn when a result carries NaN/inf (from NaN/inf in ``source``); O(output) check instead of scanning inputs.

    NaN is propagated, never replaced by a finite value: the warning is how the caller learns about it. One host
    sync; the public ops skip it with ``validate=False``. ``result`` names what turned non-finite in the message;
    ``stacklevel`` points the warning at the public op's caller (3: the op calls this directly).
    """
    if out.numel() and not bool(torch.isfinite(out).all()):
        warnings.warn(
            f"non-finite result: {source} contain NaN or inf, which propagate to the output (NaN/inf {result})",
            RuntimeWarning,
            stacklevel=stacklevel,
        )


def refuse_double_backward(op: str) -> None:
    """Call first thing in a ``backward`` whose gradient is not itself differentiable.

    Autograd runs a backward with grad mode on only for ``create_graph=True``; returning first-order gradients
    there would make every higher-order gradient through the op silently wrong (zero), so refuse it instead.
    """
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{op} does not support double backward: its backward was reached with create_graph=True, but the "
            "gradient it computes is not differentiable itself, so higher-order gradients would be wrong. Use "
            "create_graph=False for graphs through this op (or the naive_* reference ops for double backward)."
        )
