"""bitsandbytes reference copies: a frozen 8-bit / 4-bit copy of a causal LM for use as the DPO reference.

:func:`quantize_model` replaces every ``nn.Linear`` of the backbone with a bitsandbytes layer (the output head stays
dense: the fused head needs its weight), quantizing each layer from a CPU copy and then moving it to the model's
device. :func:`quantized_linear` builds one layer. On CPUs with AVX512-BF16, bitsandbytes >= 0.49
repacks 4-bit weights in place on their first forward in eval mode and computes in bf16; that path is switched off on
these layers, and :func:`four_bit_forward_problem` probes the CPU forward once per process and refuses a wrong one.
"""

from __future__ import annotations

import copy
import functools
from typing import Any, Literal

import torch
from torch import nn

from fastdpo.models import resolve_lm

__all__ = ["four_bit_forward_problem", "quantize_model", "quantized_linear"]


def quantize_model(
    model: nn.Module,
    bits: Literal[4, 8] = 8,
    *,
    compute_dtype: torch.dtype = torch.float32,
    quant_type: Literal["nf4", "fp4"] = "nf4",
    threshold: float = 0.0,
) -> nn.Module:
    """A frozen bitsandbytes copy of ``model`` for use as the reference: every ``nn.Linear`` of the backbone becomes
    ``Linear8bitLt`` (``bits=8``, LLM.int8 with outlier ``threshold``) or ``Linear4bit`` (``bits=4``, ``quant_type``
    nf4/fp4, computing in ``compute_dtype``). The output embedding stays dense (the fused head reads its weight).

    Where quantization happens: each layer is built from a CPU copy of its weight and then moved to the layer's device
    with ``.to(device)``, the path bitsandbytes documents ("quantization happens on ``.to``"): ``Int8Params.to``
    quantizes only from CPU data, so a layer built on the GPU would keep its full-precision weight there until the
    first forward. The full-precision weights of the quantized layers are never copied on the model's device (the
    rest of the model is). See :func:`quantized_linear`.

    4-bit on CPU: bitsandbytes >= 0.49 replaces a ``Linear4bit``'s weight in place on its first CPU inference call
    when the CPU has AVX512-BF16 (Intel Xeon since Cooper Lake, AMD Zen 4): it repacks the weight into another layout
    and from then on computes in bfloat16, whatever ``compute_dtype`` says (relative error ~4e-3 instead of ~1e-7),
    and fails on layers whose sizes are not multiples of 32 / the block size. The reference must not depend on the
    CPU family, so that path is switched off on the copy (every CPU then dequantizes and multiplies in
    ``compute_dtype``), and a probe layer checks once per process that the CPU forward leaves the weight alone and
    computes with the dequantized weight; if a bitsandbytes version computes something else, ``RuntimeError`` says so
    instead of returning a wrong reference.

    The copy is in eval mode with ``requires_grad=False``; ``model`` itself is left untouched. Raises ``ImportError``
    without bitsandbytes and ``ValueError`` for other ``bits`` or ``quant_type``.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    import bitsandbytes  # noqa: F401  (ImportError without it, before any copy is made)

    skip = {id(m) for m in resolve_lm(model).head.modules()}
    targets = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) not in skip}
    if bits == 4 and any(lin.weight.device.type == "cpu" for lin in targets.values()):
        problem = _cpu_4bit_problem(compute_dtype, quant_type)
        if problem is not None:
            raise RuntimeError(f"refusing a 4-bit reference on CPU: {problem}; use bits=8, or a GPU")
    # Deep-copy the model except the weights (and biases) of the layers about to be quantized: the memo hands the
    # copy an empty meta placeholder for each, so no full-precision duplicate of them is ever allocated. A tensor the
    # rest of the model also uses (an unusual tie) is copied normally.
    targets_ids = {id(m) for m in targets.values()}
    shared = {id(p) for m in model.modules() if id(m) not in targets_ids for p in m.parameters(recurse=False)}
    memo: dict[int, Any] = {}
    for lin in targets.values():
        for p in (lin.weight, lin.bias):
            if p is not None and id(p) not in shared:
                memo[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False)
    quantized = copy.deepcopy(model, memo)
    for name, lin in targets.items():
        new = quantized_linear(lin, bits, compute_dtype=compute_dtype, quant_type=quant_type, threshold=threshold)
        parent_name, _, child = name.rpartition(".")
        parent = quantized.get_submodule(parent_name) if parent_name else quantized
        setattr(parent, child, new)
    quantized.eval()
    quantized.requires_grad_(False)
    return quantized


def quantized_linear(
    lin: nn.Linear,
    bits: Literal[4, 8],
    *,
    compute_dtype: torch.dtype = torch.float32,
    quant_type: Literal["nf4", "fp4"] = "nf4",
    threshold: float = 0.0,
    device: torch.device | str | None = None,
) -> nn.Module:
    """The bitsandbytes replacement of ``lin`` (``Linear8bitLt`` or ``Linear4bit``), quantized, on ``device``
    (default: ``lin``'s), frozen.

    The layer is built around a CPU copy of the weight and moved with ``.to(device)``, which is where bitsandbytes
    quantizes (``Int8Params`` / ``Params4bit``): the 8-bit weight becomes int8 data plus fp32 row scales, the 4-bit
    one packed 4-bit data plus block statistics; the fp copy is dropped. A 4-bit layer never takes bitsandbytes'
    in-place AVX512-BF16 repacking path (see :func:`quantize_model`).
    """
    import bitsandbytes as bnb

    device = torch.device(device) if device is not None else lin.weight.device
    weight = lin.weight.detach().to("cpu", torch.float32)
    bias = None if lin.bias is None else lin.bias.detach().to("cpu", compute_dtype).clone()
    if bits == 8:
        new = bnb.nn.Linear8bitLt(
            lin.in_features, lin.out_features, bias=False, has_fp16_weights=False, threshold=threshold, device="meta"
        )
        new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    elif bits == 4:
        new = bnb.nn.Linear4bit(
            lin.in_features,
            lin.out_features,
            bias=False,
            compute_dtype=compute_dtype,
            quant_type=quant_type,
            device="meta",
        )
        new.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=quant_type, module=new)
        new.support_avx512bf16_for_cpu = False  # no in-place repack into the bf16-only CPU layout
    else:
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    if bias is not None:
        new.bias = nn.Parameter(bias, requires_grad=False)
    new = new.to(device)  # bitsandbytes quantizes here, from the CPU data
    new.eval()
    new.requires_grad_(False)
    return new


@functools.cache
def _cpu_4bit_problem(compute_dtype: torch.dtype, quant_type: str) -> str | None:
    """``None`` when a CPU :func:`quantized_linear` 4-bit layer computes ``x @ dequantize(W).T`` and leaves its weight
    unchanged, else what went wrong (checked on a probe layer of odd size, once per process and setting)."""
    probe = nn.Linear(80, 48, bias=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        nn.init.normal_(probe.weight)
        nn.init.normal_(probe.bias)
        x = torch.randn(5, 80, dtype=compute_dtype)
    layer = quantized_linear(probe, 4, compute_dtype=compute_dtype, quant_type=quant_type, device="cpu")
    return four_bit_forward_problem(layer, x)


def four_bit_forward_problem(layer: nn.Module, x: torch.Tensor) -> str | None:
    """Run a bitsandbytes ``Linear4bit`` ``layer`` on ``x`` ``[M, K]`` as a reference does (eval, no grad) and return
    ``None`` if it computed ``x @ dequantize(W).T + b`` (error within a few ulps of its ``compute_dtype``) and left
    its weight and quantization statistics as they were, else a description of the difference."""
    import bitsandbytes as bnb

    weight, state = layer.weight, layer.weight.quant_state
    data, absmax = weight.data.clone(), state.absmax.clone()
    dense = bnb.functional.dequantize_4bit(weight.data, state).double()
    bias = layer.bias.double() if layer.bias is not None else 0.0
    expected = x.double() @ dense.T + bias
    with torch.no_grad():
        try:
            out = layer(x)
        except Exception as exc:  # noqa: BLE001 - any failure of the library's forward is the finding
            return f"bitsandbytes {bnb.__version__}'s 4-bit CPU forward fails ({type(exc).__name__}: {exc})"
    if (
        weight.data.shape != data.shape
        or not torch.equal(weight.data, data)
        or state.absmax.dtype != absmax.dtype
        or not torch.equal(state.absmax, absmax)
    ):
        return (
            f"bitsandbytes {bnb.__version__}'s 4-bit CPU forward rewrote the layer's weight in place (another "
            "layout after the first call)"
        )
    eps = torch.finfo(layer.compute_dtype or torch.float32).eps
    err = (out.double() - expected).abs().max().item() / max(expected.abs().max().item(), 1e-30)
    if not err <= 16 * eps:
        return (
            f"bitsandbytes {bnb.__version__}'s 4-bit CPU forward differs from the dequantized weights by "
            f"{err:.2e} (relative), more than {layer.compute_dtype} rounding"
        )
    return None
