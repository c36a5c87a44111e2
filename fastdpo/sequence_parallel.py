"""Sequence parallelism for the DPO engine: shard a collated batch over a group, reduce the head's token outputs.

Contract (what :class:`fastdpo.DPOEngine` does with ``sequence_parallel_size=k``): every rank of a group of ``k``
ranks receives the *same* collated batch (checked: a fingerprint is compared across the group once per step). Rank
``r`` pads the ``L`` columns of every row up to ``Lp = k · Ls``, ``Ls = ceil(L / k)`` (pad columns: pad token, no
sequence, no label refers to them) and runs the backbone on columns ``[r · Ls, (r + 1) · Ls)`` with the *global*
position ids of those columns. Attention is Ulysses all-to-all (:mod:`fastdpo.ulysses`): every rank attends over the
whole sequence for its heads, so the collator's masks -- ``pad``, ``padding_free``, ``prefix_shared`` -- are used
unchanged, built once for the full padded length (:func:`full_attention_kwargs`).

The head needs no hidden state from another shard. A completion token at column ``t + 1`` is scored from the hidden
state at column ``t`` (``batch["logp_index"]``); each scored token is assigned to the rank that *holds that predicting
position*, and labels are known to every rank. So a completion that crosses a shard boundary -- its token at column
``r · Ls`` predicted by the last hidden state of shard ``r - 1`` -- is scored on rank ``r - 1`` from its own hidden
state: the exchange of boundary hidden states that a "score the tokens you hold" split would need never happens.

Reduction: each rank runs the fused head on the tokens it owns and scatters their log-probs and statistics into
``[M]`` vectors (zeros at tokens other ranks own), which are summed over the group. Every rank then holds the full
per-token vectors, bit for bit what one process computes (each entry is one rank's value plus exact zeros), and the
engine's own code forms the per-sequence sums, LD-DPO's weighted sums, WPO's weights and the token metrics from them
unchanged. (Summing ``[M]`` rather than ``[2P]`` per-sequence partial sums costs ``M`` scalars per statistic -- at most
``R·L``, against the all-to-alls' ``4·R·L·H·d`` per layer -- and keeps the single-process summation order.)

Gradients: the loss is computed identically on every rank of the group from the reduced vectors, so the gradient of
rank ``r``'s own token log-probs is just the loss gradient at those tokens: the backward of the sum is the identity on
each rank's part, *not* another all-reduce (that would multiply it by ``k``). :class:`_SumOverGroup` returns the
incoming gradient times ``k``: after backward, each rank holds ``k`` times the gradient contribution of the
computations it ran (its tokens' head, its columns' layers, and -- through the all-to-alls' backward -- its heads'
attention), and the *mean* over the group of those is the single-process gradient. That is exactly what a
data-parallel wrapper over all ``dp × sp`` ranks computes (``DistributedDataParallel`` averages, FSDP2 reduce-scatters
the average), so with such a wrapper the gradients equal the single-process ones without any extra call; a model
without a wrapper needs :func:`average_gradients` (``DPOEngine.reduce_sequence_parallel_gradients()``) after backward.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fastdpo.head.function import TokenStats
from fastdpo.ulysses import KWARG, UlyssesContext, enable_ulysses_attention, underlying_implementation

__all__ = [
    "SequenceParallel",
    "SequenceShard",
    "average_gradients",
    "full_attention_kwargs",
    "pad_batch",
    "resolve_group",
    "sum_over_group",
    "token_owners",
]

# batch tensors laid out [R, L]: padded to [R, Lp] (fill value), then sliced per rank where the forward needs them
_ROW_KEYS = {
    "input_ids": None,
    "position_ids": None,
    "attention_mask": 0,
    "token_seq": -1,
    "token_role": -1,
    "token_pair": -1,
}

_GROUPS: dict[tuple[int, int], Any] = {}


def resolve_group(size: int, group: Any = None) -> Any:
    """The process group of this rank's sequence-parallel group of ``size`` ranks.

    ``group``: ``None`` (contiguous ranks ``[i·size, (i+1)·size)`` form group ``i``; created once per ``size`` with
    ``dist.new_subgroups``, a collective every rank must reach), a ``ProcessGroup`` of ``size`` ranks, or a
    ``DeviceMesh`` (1-D, or with an ``"sp"`` dimension).

    Raises ``RuntimeError`` without an initialized default process group, ``ValueError`` when the world size is not a
    multiple of ``size`` or the group has another size.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "sequence_parallel_size > 1 needs torch.distributed initialized (torchrun / "
            "dist.init_process_group) before the engine is built"
        )
    world = dist.get_world_size()
    if group is None:
        if world % size:
            raise ValueError(
                f"sequence_parallel_size={size} must divide the world size {world} "
                "(world = data-parallel size x sequence-parallel size)"
            )
        key = (size, world)
        if key not in _GROUPS:
            _GROUPS[key] = dist.new_subgroups(group_size=size)[0]
        group = _GROUPS[key]
    else:
        from torch.distributed.device_mesh import DeviceMesh

        if isinstance(group, DeviceMesh):
            names = group.mesh_dim_names or ()
            if group.ndim == 1:
                group = group.get_group()
            elif "sp" in names:
                group = group["sp"].get_group()
            else:
                raise ValueError(f"a {group.ndim}-D DeviceMesh needs an 'sp' dimension, got names {names}")
    got = dist.get_world_size(group)
    if got != size:
        raise ValueError(f"sequence_parallel_group has {got} ranks but sequence_parallel_size={size}")
    return group


class _SumOverGroup(torch.autograd.Function):
    """Sum over the group in forward; backward passes the incoming gradient times ``grad_scale`` to this rank's
    addend (see the module docstring: every rank computes the same loss from the sum, so the addend's gradient is
    the sum's; ``grad_scale = k`` makes the group *mean* of the parameter gradients the single-process one)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any, grad_scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.grad_scale = grad_scale
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        return grad * ctx.grad_scale, None, None


def sum_over_group(x: torch.Tensor, group: Any, grad_scale: float) -> torch.Tensor:
    """``sum`` of ``x`` over ``group`` (same on every rank), differentiable: ``d(out)/d(x)`` is ``grad_scale`` times
    the identity on each rank (not the sum of the ranks' gradients). Without grad it is a plain all-reduce."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        out = x.detach().clone()
        dist.all_reduce(out, group=group)
        return out
    return _SumOverGroup.apply(x, group, float(grad_scale))


def average_gradients(model: nn.Module, group: Any, bucket_bytes: int = 25 * 2**20) -> None:
    """Average the ``.grad`` of every parameter of ``model`` over ``group`` (in place; one all-reduce per bucket of at
    most ``bucket_bytes`` of same-dtype, same-device gradients -- DDP's default bucket size -- or per larger
    gradient). For a sequence-parallel group without a data-parallel wrapper: after it, the gradients equal the
    single-process ones. Raises ``TypeError`` for ``DTensor`` (FSDP2) or sparse gradients: their wrapper reduces them.
    """
    size = dist.get_world_size(group)
    buckets: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}

    def flush(grads: list[torch.Tensor]) -> None:
        if len(grads) == 1:
            dist.all_reduce(grads[0], group=group)
            grads[0].div_(size)
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        flat.div_(size)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    for p in model.parameters():
        g = p.grad
        if g is None:
            continue
        if type(g).__name__ == "DTensor" or g.is_sparse:
            raise TypeError(
                f"average_gradients handles dense local gradients; got a {type(g).__name__}"
                f"{' (sparse)' if g.is_sparse else ''} -- its FSDP2/DDP wrapper reduces it"
            )
        bucket = buckets.setdefault((g.dtype, g.device), [])
        if bucket and (sum(t.numel() for t in bucket) + g.numel()) * g.element_size() > bucket_bytes:
            flush(bucket)
            bucket.clear()
        bucket.append(g)
    for bucket in buckets.values():
        if bucket:
            flush(bucket)


def pad_batch(batch: Mapping[str, Any], size: int) -> dict[str, Any]:
    """A copy of a collated batch with its ``[R, L]`` tensors padded on the right to ``Lp = size · ceil(L / size)``
    columns (pad columns: token id 0, ``attention_mask`` 0, no sequence/role/pair; position ids continue counting
    for ``"pad"`` batches and restart at 0 for packed ones, as the collator pads) and ``logp_index`` re-based to
    ``Lp``. The batch itself is returned (as a dict) when ``L`` is already a multiple of ``size``."""
    rows, length = batch["input_ids"].shape
    padded_length = size * math.ceil(length / size)
    out = dict(batch)
    extra = padded_length - length
    if extra == 0:
        return out
    for key, fill in _ROW_KEYS.items():
        t = batch.get(key)
        if not isinstance(t, torch.Tensor):
            continue
        if key == "position_ids":
            ramp = torch.arange(1, extra + 1, device=t.device, dtype=t.dtype)
            tail = t[:, -1:] + ramp if batch.get("packing") == "pad" else (ramp - 1).expand(rows, extra)
        else:
            tail = t.new_full((rows, extra), 0 if fill is None else fill)
        out[key] = torch.cat([t, tail], dim=1)
    idx = batch["logp_index"]
    out["logp_index"] = idx // length * padded_length + idx % length
    return out


def token_owners(logp_index: torch.Tensor, length: int, size: int) -> torch.Tensor:
    """int64 ``[M]``: the rank whose shard holds each scored token's *predicting* position (``logp_index``, flat
    ``r · length + t`` into the unpadded ``[R, length]`` batch): ``t // ceil(length / size)``."""
    return logp_index % length // math.ceil(length / size)


def _sliding_layers(config: Any) -> bool:
    """Whether some attention layer of ``config`` has a sliding window."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return "sliding_attention" in set(layer_types)
    return getattr(config, "sliding_window", None) is not None


class _ImplView:
    """What :func:`fastdpo.attention.build_attention_kwargs` reads of a model (``config``, ``parameters()``), with the
    Ulysses model's *underlying* implementation as ``config._attn_implementation``."""

    def __init__(self, hf_model: nn.Module, impl: str) -> None:
        import copy

        self.config = copy.copy(hf_model.config)
        self.config._attn_implementation_internal = impl
        self._model = hf_model

    def parameters(self) -> Any:
        return self._model.parameters()


def full_attention_kwargs(
    padded: dict[str, Any], hf_model: nn.Module, impl: str, attn_impl: str = "auto"
) -> dict[str, Any]:
    """Full-length attention kwargs (no position ids) for a padded batch and the model's underlying implementation.

    Packed batches get :func:`fastdpo.attention.build_attention_kwargs`' masks (or flash varlen ``cu_seq_lens``) for
    the full ``Lp`` columns. ``"pad"`` batches (right padding) get no mask where causality alone is exact for every
    real token -- flash, and SDPA's full-attention layers -- and otherwise the mask of each row as one sequence (real
    tokens attend causally to real tokens; pad queries to themselves, which nothing reads).
    """
    from fastdpo.attention import build_attention_kwargs

    view = _ImplView(hf_model, impl)
    flash = impl.startswith("flash_attention")
    if padded["packing"] == "pad":
        if flash or (impl == "sdpa" and not _sliding_layers(hf_model.config)):
            return {}
        masks = build_attention_kwargs(dict(padded, packing="padding_free"), view)["attention_mask"]
        if impl == "sdpa" and isinstance(masks, dict):
            masks = {kind: (None if kind == "full_attention" else m) for kind, m in masks.items()}
        return {"attention_mask": masks}
    kwargs = build_attention_kwargs(padded, view, impl=attn_impl)
    kwargs.pop("position_ids", None)
    return kwargs


@dataclass
class SequenceShard:
    """This rank's part of one collated batch.

    Attributes:
        input_ids, position_ids: int64 ``[R, Ls]``, columns ``[rank · Ls, (rank + 1) · Ls)`` of the padded batch.
        attention_kwargs: full-length masks / flash varlen kwargs (see :func:`full_attention_kwargs`).
        context: the :class:`~fastdpo.ulysses.UlyssesContext` (full-length position ids).
        owned: int64 ``[m]``, the scored tokens (indices into the batch's ``[M]``) this rank's hidden states predict.
        local_index: int64 ``[m]``, their predicting positions as flat indices into this rank's ``[R · Ls]``.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_kwargs: dict[str, Any]
    context: UlyssesContext
    owned: torch.Tensor
    local_index: torch.Tensor

    def forward_kwargs(self) -> dict[str, Any]:
        """Model-forward kwargs of this shard (besides ``input_ids``)."""
        return {"position_ids": self.position_ids, **self.attention_kwargs, KWARG: self.context}


def _fingerprint(batch: Mapping[str, Any]) -> torch.Tensor:
    """int64 ``[8]`` summary of a batch (shapes, weighted id sums): equal on ranks that hold the same batch."""
    ids, idx = batch["input_ids"], batch["logp_index"]
    weights = torch.arange(1, ids.numel() + 1, device=ids.device, dtype=torch.int64).view_as(ids) % 65521
    labels = batch["logp_labels"]
    lw = torch.arange(1, labels.numel() + 1, device=labels.device, dtype=torch.int64) % 65521
    return torch.stack(
        [
            torch.tensor(ids.shape[0], device=ids.device),
            torch.tensor(ids.shape[1], device=ids.device),
            torch.tensor(idx.numel(), device=ids.device),
            torch.tensor(int(batch["num_pairs"]), device=ids.device),
            (ids * weights).sum(),
            (batch["position_ids"] * weights).sum(),
            (labels * lw).sum(),
            (idx * lw).sum(),
        ]
    ).to(torch.int64)


class SequenceParallel:
    """One rank's view of its sequence-parallel group: model preparation, batch sharding, token-output reduction.

    Args:
        size: ``k`` >= 2 ranks per group.
        group: see :func:`resolve_group`.
        attn_impl: forwarded to :func:`fastdpo.attention.build_attention_kwargs` for packed batches.
    """

    def __init__(self, size: int, group: Any = None, *, attn_impl: str = "auto") -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 2:
            raise ValueError(f"SequenceParallel needs size >= 2, got {size!r}")
        self.size = size
        self.group = resolve_group(size, group)
        self.rank = dist.get_rank(self.group)
        self.attn_impl = attn_impl
        self._cached: tuple[torch.Tensor, Any, SequenceShard] | None = None

    def prepare(self, hf_model: nn.Module) -> str:
        """Switch ``hf_model`` (the Hugging Face model, wrappers removed) to Ulysses attention; returns the
        underlying implementation. Raises ``ValueError`` when its heads do not split over the group."""
        return enable_ulysses_attention(hf_model, self.size)

    @staticmethod
    def check_wrapper(model: nn.Module) -> None:
        """Raise ``ValueError`` for a ``DistributedDataParallel`` wrapper that does not span every rank: the gradient
        convention (module docstring) needs the wrapper's mean over all ``dp × sp`` ranks."""
        from torch.nn.parallel import DistributedDataParallel

        if isinstance(model, DistributedDataParallel):
            size, world = dist.get_world_size(model.process_group), dist.get_world_size()
            if size != world:
                raise ValueError(
                    f"the DistributedDataParallel wrapper spans {size} of {world} ranks; with sequence parallelism it "
                    "must average over all ranks (data-parallel x sequence-parallel): build it with the default group"
                )

    def clear(self) -> None:
        """Drop the cached shard (the engine calls it when a step ends)."""
        self._cached = None

    def check_same_batch(self, batch: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` on every rank unless all ranks of the group hold the same batch (one small
        all-gather): a data loader sharded over the sequence-parallel ranks would otherwise train on garbage."""
        mine = _fingerprint(batch)
        every = [torch.empty_like(mine) for _ in range(self.size)]
        dist.all_gather(every, mine, group=self.group)
        if any(not torch.equal(mine, other) for other in every):
            raise ValueError(
                "the ranks of a sequence-parallel group hold different batches; every rank of a group must pass the "
                "same collated batch (shard the data over data-parallel ranks only: rank // sequence_parallel_size)"
            )

    def shard(self, batch: Mapping[str, Any], hf_model: nn.Module, *, cache: bool = False) -> SequenceShard:
        """This rank's :class:`SequenceShard` of ``batch`` for ``hf_model`` (a Ulysses model, see :meth:`prepare`).

        With ``cache``, the shard is kept for the next call on the same ``input_ids`` tensor and the same mask format
        (the reference and the policy forwards of one step); the first call checks that the group holds one batch.
        """
        impl = underlying_implementation(getattr(hf_model.config, "_attn_implementation", None))
        if impl is None:
            raise ValueError(
                f"{type(hf_model).__name__} does not run Ulysses attention; the engine prepares the "
                "models it is given (DPOEngine(sequence_parallel_size=k))"
            )
        param = next((p for p in hf_model.parameters() if p.is_floating_point()), None)
        key = (impl, None if param is None else (param.dtype, param.device))
        if self._cached is not None and self._cached[0] is batch["input_ids"] and self._cached[1] == key:
            return self._cached[2]
        self.check_same_batch(batch)
        padded = pad_batch(batch, self.size)
        padded_length = padded["input_ids"].shape[1]
        ls = padded_length // self.size
        cols = slice(self.rank * ls, (self.rank + 1) * ls)
        owned = token_owners(batch["logp_index"], batch["input_ids"].shape[1], self.size) == self.rank
        owned = owned.nonzero().flatten()
        idx = padded["logp_index"]
        row, col = idx // padded_length, idx % padded_length
        shard = SequenceShard(
            input_ids=padded["input_ids"][:, cols].contiguous(),
            position_ids=padded["position_ids"][:, cols].contiguous(),
            attention_kwargs=full_attention_kwargs(padded, hf_model, impl, self.attn_impl),
            context=UlyssesContext(self.group, self.size, padded["position_ids"]),
            owned=owned,
            local_index=(row * ls + col - cols.start).index_select(0, owned),
        )
        if cache:
            self._cached = (batch["input_ids"], key, shard)
        return shard

    def gather_token_stats(self, stats: TokenStats, shard: SequenceShard, num_tokens: int) -> TokenStats:
        """Full ``[M]`` :class:`~fastdpo.head.TokenStats` from this rank's ``[m]`` owned tokens' (zeros at
        the other ranks' tokens, summed over the group: two all-reduces, one for the differentiable log-probs with the
        gradient convention of :func:`sum_over_group`, one for the detached statistics stacked)."""
        owned = shard.owned
        logprobs = stats.logprobs.new_zeros(num_tokens).index_copy(0, owned, stats.logprobs)
        logprobs = sum_over_group(logprobs, self.group, self.size)
        names = [n for n in ("entropy", "log_sum_p2", "mean_logit", "argmax_hit") if getattr(stats, n) is not None]
        if not names:
            return TokenStats(logprobs)
        dtype = logprobs.dtype  # fp32 (fp64 for fp64 inputs); the bool hits travel as exact 0 / 1
        local = torch.stack([getattr(stats, n).detach().to(dtype) for n in names])
        full = local.new_zeros(len(names), num_tokens).index_copy(1, owned, local)
        dist.all_reduce(full, group=self.group)
        out = {
            n: full[i].to(getattr(stats, n).dtype) if n != "argmax_hit" else full[i] > 0.5 for i, n in enumerate(names)
        }
        return TokenStats(logprobs, **out)
