"""The fused LM head's autograd Function and its public entry points :func:`linear_token_logprobs` and
:func:`linear_sequence_logprobs`: token / sequence log-probabilities straight from hidden states, never materializing
``[N, V]`` logits.

Logit definition (matches HF models incl. Gemma 2)::

    x = hidden @ weight.T + bias                # the vendor GEMM, tile by tile
    z = x * logit_scale
    z = softcap * tanh(z / softcap)             # when softcap is given
    z = z / temperature
    logprob = z[label] - logsumexp(z)

Only positions whose label is not ``ignore_index`` are projected (they are compacted first). The work is tiled over
tokens x vocabulary (:mod:`fastdpo.head.plan`): each tile is one ``torch.mm`` into a bounded, reused buffer, folded
into per-token running state (:mod:`fastdpo.head.tiles`). The backward recomputes each tile (apart from the first
tiles kept from the forward within ``keep_logits_bytes``), turns it into the logit gradient in place and accumulates
``grad_hidden`` and ``grad_weight`` in fp32 with two more GEMMs (:mod:`fastdpo.head.sweeps`).

Saved for backward (all through ``save_for_backward``, so saved-tensor hooks see everything): the compacted hidden
states (the input itself when nothing is masked), the weight, labels and ``lse`` (``O(N)``, float64), plus at most
``keep_logits_bytes`` of logits tiles (default 176 MiB) whose recompute the backward then skips; nothing else grows
with ``V``. Under ``torch.no_grad()`` / ``inference_mode`` or when nothing requires grad nothing is saved at all.
Kept tiles are only an optimisation: the first backward overwrites them, and any later backward through the same
graph (``retain_graph=True``, several losses on one forward, ``torch.autograd.grad`` per output) recomputes them,
so every backward gives the same gradients. Double backward (``create_graph=True``) raises.

Statistics (entropy, ``log sum p^2``, vocabulary-mean logit, top-1 hit) are returned without gradient (TRL's entropy
is differentiable; here it is a metric only). float64 inputs always use the torch path and return float64 log-probs.
Distributed weights: :mod:`fastdpo.head.gather`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from fastdpo._validation import check_index, check_same_device, refuse_double_backward, warn_nonfinite_output
from fastdpo.head.checks import _check_inputs
from fastdpo.head.gather import GatherContext, _enter, _gather_bias, _gather_weight
from fastdpo.head.options import HeadOptions, _Returns, advertise_head_keywords, head_keywords
from fastdpo.head.plan import DEFAULT_KEEP_LOGITS_BYTES, _resolve, _Spec
from fastdpo.head.sweeps import _backward_sweep, _forward_sweep, _Kept
from fastdpo.head.tiles import _outputs_from_fold
from fastdpo.segments import check_segments, segment_counts, segment_sum

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from fastdpo.head.options import HeadKeywords

__all__ = ["TokenStats", "linear_sequence_logprobs", "linear_token_logprobs"]


class TokenStats(NamedTuple):
    """Per-token outputs of :func:`linear_token_logprobs` (each shaped like ``labels``; 0 / False where ignored).

    ``logprobs`` fp32, differentiable wrt hidden, weight and bias. ``entropy`` (fp32, ``-sum p log p``),
    ``log_sum_p2`` (fp32, ``log sum p^2``, WPO), ``mean_logit`` (fp32, mean of z over the vocabulary) and
    ``argmax_hit`` (bool, ``argmax z == label``, first maximum wins ties) are ``None`` unless requested and carry no
    gradient.
    """

    logprobs: torch.Tensor
    entropy: torch.Tensor | None = None
    log_sum_p2: torch.Tensor | None = None
    mean_logit: torch.Tensor | None = None
    argmax_hit: torch.Tensor | None = None


class _Call(NamedTuple):
    """What one autograd call of the head computes and keeps, fixed for the call: the transform and tiles, the
    statistics the fold computes, the kept-logits budget (bytes) and the ZeRO-3 gather context (entered again around
    the backward sweep)."""

    spec: _Spec
    returns: _Returns
    keep_bytes: int
    gather_context: GatherContext | None


class _LinearLogprobs(torch.autograd.Function):
    """The fused head's autograd node: ``(h [n, D] compacted, w [V, D], b [V] | None, labels [n] int64, call)`` ->
    ``(logp [n], *statistics [n] the call returns)``.

    Kept logits tiles are an optimisation only: the first backward overwrites them (they become gradient tiles and
    the recompute buffer) and records that it did; any later backward through the same graph (``retain_graph=True``,
    several losses sharing one forward, ``torch.autograd.grad`` per output) recomputes every tile from the saved
    hidden states and weight, so every backward gives the same, correct gradients on both backends, at no extra
    memory in the ordinary single backward.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, labels: torch.Tensor, call: _Call
    ):
        kept = _Kept(call.keep_bytes)
        st = _forward_sweep(h, w, b, labels, call.spec, call.returns.stats, call.returns.argmax_hit, kept)
        lse, logp, entropy, log_sum_p2, mean_logit, hit = _outputs_from_fold(st, labels, w.shape[0])
        ctx.spec = call.spec
        ctx.gather_context = call.gather_context
        ctx.has_bias = b is not None
        # kept logits tiles go through save_for_backward too, so saved-tensor hooks see (and may offload) them
        ctx.kept_keys = list(kept.tiles)
        kept_tiles = [kept.tiles[k] for k in ctx.kept_keys]
        ctx.kept_budget = kept.budget
        ctx.kept_consumed = False
        if call.gather_context is not None:
            # ZeRO-3: the parameter's storage is only valid inside the context; keep the parameter itself.
            ctx.w_param, ctx.b_param = w, b
            ctx.save_for_backward(h, labels, lse, *kept_tiles)
        else:
            ctx.save_for_backward(h, labels, lse, *kept_tiles, w, b)
        outs = [logp]
        for o in (entropy, log_sum_p2, mean_logit, hit):
            if o is not None:
                ctx.mark_non_differentiable(o)
                outs.append(o)
        return tuple(outs)

    @staticmethod
    def backward(ctx: Any, grad_logp: torch.Tensor, *unused: torch.Tensor):  # type: ignore[override]
        refuse_double_backward("the fused LM head (linear_token_logprobs / linear_sequence_logprobs)")
        saved = ctx.saved_tensors
        h, labels, lse = saved[:3]
        nk = len(ctx.kept_keys)
        kept = None
        if not ctx.kept_consumed:
            ctx.kept_consumed = True  # set first: a backward interrupted half-way leaves tiles half-overwritten
            kept = _Kept(ctx.kept_budget)
            # .data: the tiles are private to this node and their overwrite is tracked by kept_consumed; the version
            # bump of an in-place op (which the Triton kernels do not do anyway) would make a later backward's
            # ctx.saved_tensors raise instead of recomputing.
            kept.tiles = {k: t.data for k, t in zip(ctx.kept_keys, saved[3 : 3 + nk])}
        if ctx.gather_context is not None:
            w, b = ctx.w_param, ctx.b_param
        else:
            w, b = saved[3 + nk], saved[4 + nk]
        del saved
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        with _enter(ctx.gather_context):
            gh, gw, gb = _backward_sweep(
                h, w, b, labels, lse, grad_logp, ctx.spec, kept, need_h, need_w, need_b and ctx.has_bias
            )
            gh = None if gh is None else gh.to(h.dtype)
            gw = None if gw is None else gw.to(w.dtype)
            gb = None if (gb is None or b is None) else gb.to(b.dtype)
        return gh, gw, gb, None, None


@advertise_head_keywords(chunk_size=True)
def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    return_entropy: bool = False,
    return_log_sum_p2: bool = False,
    return_mean_logit: bool = False,
    return_argmax_hit: bool = False,
    **head_options: Unpack[HeadKeywords],
) -> TokenStats:
    """Per-token log-probs (and optional statistics) of ``labels`` under the LM head, without ``[N, V]`` logits.

    ``head_options`` are the keywords below from ``ignore_index`` on, read into one checked
    :class:`~fastdpo.head.options.HeadOptions` (any other keyword is a ``TypeError``); :func:`linear_sequence_logprobs`,
    :func:`~fastdpo.head.linear_logprobs_loss_grad_in_forward` and
    :func:`fastdpo.reference.naive_linear_token_logprobs` read theirs the same way. ``inspect.signature`` shows each.

    Args:
        hidden: ``[..., D]`` float (fp16/bf16/fp32/fp64).
        weight: ``[V, D]`` float (output embedding; may be tied to the input embedding — its gradient then simply
            accumulates; may be an FSDP2 ``DTensor`` — gathered once per call, gradient redistributed by autograd).
        labels: ``[...]`` integer (``hidden.shape[:-1]``), ``ignore_index`` or in ``[0, V)``.
        bias: optional ``[V]``.
        return_*: which statistics to compute (no gradient; see :class:`TokenStats`).
        ignore_index: label of the positions that are not scored (default -100).
        softcap, logit_scale, temperature: logit transform (module docstring; defaults ``None``, 1, 1).
        token_tile, vocab_tile: rows and vocabulary columns of one projection tile; ``None`` picks each from the
            shapes and device (:func:`fastdpo.head.plan._plan`).
        validate: ``True`` checks that every label is ``ignore_index`` or in ``[0, V)`` before any kernel runs
            (``ValueError``; one device sync) and warns (``RuntimeWarning``) when a log-prob is NaN/inf (another
            sync). ``False`` skips both for hot loops; a label outside the vocabulary then gives a NaN log-prob
            (never an out-of-bounds access) and a zero gradient row, on both backends.
        backend: ``"auto"`` (Triton fold kernels on CUDA), ``"triton"``, ``"torch"``; float64 inputs always take
            the torch path.
        gather_context: ZeRO-3 style partitioned weight: a callable returning a context manager inside which
            ``weight``/``bias`` hold their full values; entered around the forward and around the backward sweep.
        keep_logits_bytes: raw logits kept from the forward to skip that part of the backward's recompute GEMM
            (default ``DEFAULT_KEEP_LOGITS_BYTES``; 0 keeps none).
        chunk_size: deprecated spelling of the tiles (an int: ``vocab_tile``; a tuple: ``(token_tile, vocab_tile)``);
            ``DeprecationWarning``.

    Returns:
        :class:`TokenStats`; ``logprobs`` fp32 shaped like ``labels``, 0 at ignored positions.
    """
    options, _ = head_keywords("linear_token_logprobs", head_options)
    returns = _Returns(return_entropy, return_log_sum_p2, return_mean_logit, return_argmax_hit)
    return _token_stats(hidden, weight, labels, bias, options, returns)


def _token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    options: HeadOptions,
    returns: _Returns,
) -> TokenStats:
    """:func:`linear_token_logprobs` on checked options, inside the options' gather context."""
    with _enter(options.gather_context):
        _check_inputs(hidden, weight, labels, bias, options)
        resolved = _resolve(options.backend, hidden)
        w = _gather_weight(weight)
        b = _gather_bias(bias)
        hc, labc, idx = _compact(hidden, labels, options.ignore_index)
        w = w.contiguous() if options.gather_context is None else w
        spec = options.spec(hc.shape[0], weight.shape[0], hidden.device, resolved)
        wants_grad = torch.is_grad_enabled() and (
            hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
        )
        if wants_grad:
            call = _Call(spec, returns, options.keep_bytes(DEFAULT_KEEP_LOGITS_BYTES), options.gather_context)
            outs = iter(_LinearLogprobs.apply(hc, w, b, labc, call))
            logp = next(outs)
            entropy, log_sum_p2, mean_logit = (next(outs), next(outs), next(outs)) if returns.stats else (None,) * 3
            hit = next(outs) if returns.argmax_hit else None
        else:
            # reference mode: no autograd node, nothing saved, no gradient work.
            with torch.no_grad():
                st = _forward_sweep(hc, w, b, labc, spec, returns.stats, returns.argmax_hit, None)
                _, logp, entropy, log_sum_p2, mean_logit, hit = _outputs_from_fold(st, labc, weight.shape[0])
        out = TokenStats(
            _expand(logp, idx, labels.shape, 0.0),  # type: ignore[arg-type]
            _expand(entropy if returns.entropy else None, idx, labels.shape, 0.0),
            _expand(log_sum_p2 if returns.log_sum_p2 else None, idx, labels.shape, 0.0),
            _expand(mean_logit if returns.mean_logit else None, idx, labels.shape, 0.0),
            _expand(hit, idx, labels.shape, False),
        )
        if options.validate:
            warn_nonfinite_output(out.logprobs, "hidden states or weight", stacklevel=4)
    return out


def _compact(
    hidden: torch.Tensor, labels: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(h [n, D] contiguous, labels [n] int64, idx [n] | None)``: the labelled positions of ``hidden [..., D]`` and
    their flat indices (``None`` when every position is labelled: the input itself, no copy)."""
    h2 = hidden.reshape(-1, hidden.shape[-1])
    lab = labels.reshape(-1)
    idx = (lab != ignore_index).nonzero().squeeze(1)
    if idx.shape[0] == lab.shape[0]:
        return h2.contiguous(), lab.to(torch.int64).contiguous(), None
    return h2.index_select(0, idx).contiguous(), lab.index_select(0, idx).to(torch.int64).contiguous(), idx


def _expand(
    t: torch.Tensor | None, idx: torch.Tensor | None, shape: torch.Size, fill: float | bool
) -> torch.Tensor | None:
    """Per-labelled-position ``t [n]`` back to ``shape``, ``fill`` at the ignored positions (:func:`_compact`)."""
    if t is None:
        return None
    if idx is None:
        return t.reshape(shape)
    full = torch.full((shape.numel(),), fill, dtype=t.dtype, device=t.device)
    return full.index_copy(0, idx, t).reshape(shape)


@advertise_head_keywords(chunk_size=True)
def linear_sequence_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    average: bool = False,
    segment_ids: torch.Tensor | None = None,
    num_segments: int | None = None,
    **head_options: Unpack[HeadKeywords],
) -> torch.Tensor:
    """Per-sequence summed (or, with ``average``, mean) label log-probs, fp32, differentiable.

    Layouts: ``hidden [B, T, D]`` + ``labels [B, T]`` -> ``[B]``; or ``hidden [N, D]`` + ``labels [N]`` +
    ``segment_ids [N]`` (+ ``num_segments``; ids of ignored positions are not used) -> ``[S]``. A sequence without
    any label has log-prob 0 (and zero gradient). ``num_segments`` without ``segment_ids`` is an error;
    ``num_segments=None`` infers ``max + 1`` over the labelled positions (one sync) and refuses a count above ``N``
    (a stray id: pass it explicitly). ``head_options``: the keywords of :func:`linear_token_logprobs` other than the
    ``return_*`` flags (``ignore_index``, ``softcap``, ``logit_scale``, ``temperature``, ``token_tile``,
    ``vocab_tile``, ``validate``, ``backend``, ``gather_context``, ``keep_logits_bytes`` and the deprecated
    ``chunk_size``; any other keyword is a ``TypeError``). ``validate`` also checks the segment ids of labelled
    positions (in ``[0, S)``); with ``validate=False`` a token whose id lies outside adds to no sequence, and a NaN
    log-prob (an out-of-vocabulary label) propagates to its sequence.
    """
    options, _ = head_keywords("linear_sequence_logprobs", head_options)
    ignore_index = options.ignore_index
    check_index("labels", labels)
    if segment_ids is None:
        if labels.dim() != 2:
            raise ValueError(f"without segment_ids labels must be [B, T], got {list(labels.shape)}")
        if num_segments is not None:
            raise ValueError("num_segments is only meaningful together with segment_ids")
    else:
        if labels.dim() != 1:
            raise ValueError(f"with segment_ids labels must be [N], got {list(labels.shape)}")
        check_index("segment_ids", segment_ids)
        check_same_device(labels=labels, segment_ids=segment_ids)
        if segment_ids.shape != labels.shape:
            raise ValueError(f"segment_ids must have shape {list(labels.shape)}, got {list(segment_ids.shape)}")
        sel = (labels != ignore_index).nonzero().squeeze(1)
        seg = segment_ids.index_select(0, sel)
        if num_segments is None:
            if seg.numel() == 0:
                raise ValueError("num_segments is required when no position has a label")
            inferred = int(seg.max()) + 1
            if inferred > labels.shape[0]:
                raise ValueError(
                    f"num_segments=None would infer max(segment_ids) + 1 = {inferred} segments from "
                    f"{labels.shape[0]} positions; pass num_segments explicitly (or check segment_ids for a stray id)"
                )
            num_segments = inferred
        num_segments = check_segments(seg, seg.shape[0], num_segments, validate=options.validate)
    tok = _token_stats(hidden, weight, labels, bias, options, _Returns()).logprobs
    if segment_ids is None:
        out = tok.sum(dim=1)
        if average:
            out = out / (labels != ignore_index).sum(dim=1).clamp(min=1).to(out.dtype)
        return out
    out = segment_sum(tok.index_select(0, sel), seg, num_segments, validate=False, backend=options.backend)
    if average:
        out = out / segment_counts(seg, num_segments).clamp(min=1).to(out.dtype)
    return out
