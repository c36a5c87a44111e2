"""On-disk cache of reference log-probs (``DPOEngine(reference="precomputed")``).

The reference model is frozen, so its per-sequence log-probs for a dataset can be computed once and reused: training
then runs only the policy (no reference weights in memory, no reference forward). The cache is

* keyed per pair by a content hash of the tokens the collator produced (prompt ids, chosen and rejected completion
  ids), so it is independent of batch composition, order and packing;
* stamped with the reference model's fingerprint (a hash of its parameter values) and the dataset's fingerprint
  (a hash of the set of pair keys), plus the settings that change reference log-probs (``ld_alpha``,
  ``temperature``); :meth:`RefLogpCache.load` refuses a cache made for another model, dataset or settings with a
  ``ValueError`` saying which;
* written atomically (temporary file in the target directory, fsync, ``os.replace``): a crash never leaves a
  truncated cache behind, and concurrent readers see either the old or the new file;
* checksummed: the file stores a SHA-256 of its whole content (keys, values, stamps); :meth:`RefLogpCache.load`
  recomputes it, so a flipped bit in the values, a truncated or an empty file is an error naming the file, never a
  silently different reference;
* buildable shard by shard (:meth:`RefLogpCache.build_distributed`): under data parallelism or sharding (DDP,
  DeepSpeed ZeRO, FSDP2) each rank computes the log-probs of its own batches, the rows are all-gathered, rank 0
  writes the file once (atomically, checksummed) and every rank reads that verified file back -- so all ranks use
  bitwise the same values, and a resumed run finds the file and computes nothing.

File format (``fastdpo-ref-logps-v2``): a ``torch.save`` dict of plain types and tensors (``format``, ``model_hash``,
``data_hash``, ``settings``, ``keys``, ``values`` and ``sha256``), loaded with ``weights_only=True``
(:mod:`fastdpo.atomic`). Files of the first format (``fastdpo-ref-logps-v1``, written by fastdpo 0.1 without a
checksum) are refused with a message to rebuild them: their values cannot be verified, and rebuilding costs one
reference pass over the data.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypedDict

import torch
from torch import nn

from fastdpo._validation import check_keywords
from fastdpo.atomic import CorruptFileError, read_dict, save_checksummed, verify_checksum

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["CacheExpectations", "RefLogpCache", "pair_keys", "dataset_fingerprint", "model_fingerprint", "CACHE_FORMAT"]

CACHE_FORMAT = "fastdpo-ref-logps-v2"
_OLD_FORMATS = ("fastdpo-ref-logps-v1",)  # no checksum: refused, see the module docstring
_FIELDS = ("model_hash", "data_hash", "settings", "keys", "values")


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach()
    if t.device.type == "meta":
        raise ValueError("cannot fingerprint a model with parameters on the meta device")
    t = t.cpu().contiguous()
    if t.dim() == 0:
        t = t.reshape(1)
    return t.view(torch.uint8).numpy().tobytes()


def model_fingerprint(model: nn.Module, *, exclude_adapters: bool = False) -> str:
    """SHA-256 (hex) of a model's class and every parameter and buffer (name, shape, dtype, values).

    A PEFT model is fingerprinted through its inner Hugging Face model. With ``exclude_adapters=True`` adapter
    tensors (names containing ``lora_`` or ``modules_to_save``) are skipped and PEFT's wrapper names
    (``.base_layer``, ``.original_module``) dropped, which fingerprints the frozen base a PEFT model falls back to
    under ``disable_adapter()`` — equal to the fingerprint of the plain base model. Reads every byte of the weights
    once (about a second per GB).

    Sharded models are fingerprinted by their full values, so every rank gets the unsharded model's fingerprint: a
    ``DistributedDataParallel`` / ``DeepSpeedEngine`` wrapper is looked through, a DeepSpeed ZeRO-3 parameter is
    gathered (``deepspeed.zero.GatheredParameters``) and an FSDP2 ``DTensor`` all-gathered while it is hashed -- these
    are collectives: every rank must fingerprint the model at the same time.
    """
    from fastdpo.models import is_zero3_param, unwrap_ddp

    h = hashlib.sha256()
    inner = unwrap_ddp(model)
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") and hasattr(inner, "peft_config") else inner
    cls = type(inner)
    if _is_fsdp2_module(inner):  # fully_shard swaps the class for a generated FSDP<Class> subclass
        cls = cls.__bases__[-1]
    h.update(cls.__name__.encode())
    named = list(inner.named_parameters(remove_duplicate=True)) + list(inner.named_buffers(remove_duplicate=True))
    for name, tensor in sorted(named, key=lambda kv: kv[0]):
        if exclude_adapters and ("lora_" in name or "modules_to_save" in name):
            continue
        if exclude_adapters:  # PEFT renames wrapped layers `x.base_layer.weight`; key by the original name
            name = name.replace(".base_layer", "").replace(".original_module", "")
        gathered: Any = contextlib.nullcontext()
        if is_zero3_param(tensor):
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters([tensor])
        with gathered:
            full = tensor.full_tensor() if type(tensor).__name__ == "DTensor" else tensor
            h.update(f"{name}|{tuple(full.shape)}|{full.dtype}|".encode())
            h.update(_tensor_bytes(full))
    return h.hexdigest()


def _is_fsdp2_module(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed
        return False
    return isinstance(module, FSDPModule)


def _pair_token_ids(batch: Mapping[str, Any]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per pair ``(prompt_ids, chosen_completion_ids, rejected_completion_ids)`` (1-D int64 CPU tensors)."""
    for key in ("input_ids", "token_role", "token_pair", "logp_labels", "logp_seq", "num_pairs"):
        if key not in batch:
            raise ValueError(f"batch is missing {key!r}; pass a batch made by fastdpo.PreferenceCollator")
    num_pairs = int(batch["num_pairs"])
    input_ids = batch["input_ids"].reshape(-1).cpu().long()
    role = batch["token_role"].reshape(-1).cpu()
    pair = batch["token_pair"].reshape(-1).cpu()
    prompt_mask = role == 0
    if batch.get("packing", "pad") != "prefix_shared":
        # every sequence repeats its prompt; take the copy in the chosen sequence (sequence id == pair id)
        if "token_seq" not in batch:
            raise ValueError("batch is missing 'token_seq'; pass a batch made by fastdpo.PreferenceCollator")
        prompt_mask = prompt_mask & (batch["token_seq"].reshape(-1).cpu() == pair)
    labels = batch["logp_labels"].cpu().long()
    seq = batch["logp_seq"].cpu()
    out = []
    for i in range(num_pairs):
        prompt = input_ids[prompt_mask & (pair == i)]
        out.append((prompt, labels[seq == i], labels[seq == num_pairs + i]))
    return out


def pair_keys(batch: Mapping[str, Any]) -> list[str]:
    """Content hash (32 hex chars) of each pair of a collated batch: prompt ids, chosen ids, rejected ids.

    The same pair gives the same key whatever its batch, position or packing ("pad", "padding_free",
    "prefix_shared"); a different tokenization or truncation gives a different key.
    """
    keys = []
    for prompt, chosen, rejected in _pair_token_ids(batch):
        h = hashlib.sha256()
        for part in (prompt, chosen, rejected):
            h.update(len(part).to_bytes(8, "little"))
            h.update(part.numpy().tobytes())
        keys.append(h.hexdigest()[:32])
    return keys


def _batch_rows(
    compute_fn: Callable[[Mapping[str, Any]], tuple[torch.Tensor, torch.Tensor]], batch: Mapping[str, Any]
) -> tuple[list[str], torch.Tensor]:
    """``(pair_keys(batch), values [P, 2] fp32 cpu)``: ``compute_fn(batch)``'s chosen and rejected log-probs per pair;
    ``ValueError`` unless each is ``[P]``."""
    chosen, rejected = compute_fn(batch)
    batch_keys = pair_keys(batch)
    if chosen.shape != (len(batch_keys),) or rejected.shape != (len(batch_keys),):
        raise ValueError(
            f"compute_fn returned shapes {tuple(chosen.shape)}, {tuple(rejected.shape)} for a batch of "
            f"{len(batch_keys)} pairs"
        )
    return batch_keys, torch.stack([chosen.detach().float().cpu(), rejected.detach().float().cpu()], dim=1)


def dataset_fingerprint(keys: Iterable[str]) -> str:
    """SHA-256 (hex) of the set of pair keys: independent of order, batching and duplicates."""
    h = hashlib.sha256()
    for key in sorted(set(keys)):
        h.update(key.encode())
    return h.hexdigest()


def _normalize_settings(settings: Mapping[str, Any] | None) -> dict[str, Any]:
    return {str(k): (None if v is None else float(v)) for k, v in sorted((settings or {}).items())}


class CacheExpectations(TypedDict, total=False):
    """What :meth:`RefLogpCache.check` / :meth:`RefLogpCache.load` compare a cache with (each optional): the reference
    ``model`` (fingerprinted; ``exclude_adapters`` as :func:`model_fingerprint`) or its ``model_hash``; the dataset
    as ``data_hash`` (:func:`dataset_fingerprint`) or collated ``batches``; the engine ``settings``."""

    model: nn.Module | None
    model_hash: str | None
    exclude_adapters: bool
    data_hash: str | None
    batches: Iterable[Mapping[str, Any]] | None
    settings: Mapping[str, Any] | None


class RefLogpCache:
    """Reference log-probs per pair: ``key -> (chosen_logp, rejected_logp)`` fp32, with model/dataset stamps.

    Build with :meth:`build` (or ``DPOEngine.precompute_reference``), persist with :meth:`save`, reopen with
    :meth:`load`; :meth:`lookup` returns the reference log-probs for a collated batch.
    """

    def __init__(
        self, keys: list[str], values: torch.Tensor, *, model_hash: str, settings: Mapping[str, Any] | None = None
    ) -> None:
        if not isinstance(values, torch.Tensor) or values.dim() != 2 or values.shape[1] != 2:
            raise ValueError(f"values must be a [N, 2] tensor, got {getattr(values, 'shape', type(values))}")
        if len(keys) != values.shape[0]:
            raise ValueError(f"got {len(keys)} keys for {values.shape[0]} value rows")
        self.keys = list(keys)
        self.values = values.detach().to(torch.float32).cpu()
        self.model_hash = str(model_hash)
        self.settings = _normalize_settings(settings)
        self.data_hash = dataset_fingerprint(self.keys)
        self._index = {k: i for i, k in enumerate(self.keys)}

    def __len__(self) -> int:
        return len(self.keys)

    def __repr__(self) -> str:
        return (
            f"RefLogpCache({len(self)} pairs, model={self.model_hash[:12]}, data={self.data_hash[:12]}, "
            f"settings={self.settings})"
        )

    @classmethod
    def build(
        cls,
        compute_fn: Callable[[Mapping[str, Any]], tuple[torch.Tensor, torch.Tensor]],
        batches: Iterable[Mapping[str, Any]],
        *,
        model_hash: str,
        settings: Mapping[str, Any] | None = None,
    ) -> RefLogpCache:
        """Run ``compute_fn(batch) -> (ref_chosen [P], ref_rejected [P])`` over ``batches`` and collect the results.

        A pair seen twice keeps its first value.
        """
        keys: list[str] = []
        rows: list[torch.Tensor] = []
        seen: set[str] = set()
        for batch in batches:
            batch_keys, pair_values = _batch_rows(compute_fn, batch)
            for j, key in enumerate(batch_keys):
                if key not in seen:
                    seen.add(key)
                    keys.append(key)
                    rows.append(pair_values[j])
        values = torch.stack(rows) if rows else torch.zeros(0, 2)
        return cls(keys, values, model_hash=model_hash, settings=settings)

    @classmethod
    def build_distributed(
        cls,
        compute_fn: Callable[[Mapping[str, Any]], tuple[torch.Tensor, torch.Tensor]],
        batches: Iterable[Mapping[str, Any]],
        path: str | os.PathLike[str],
        *,
        model_hash: str,
        settings: Mapping[str, Any] | None = None,
        group: Any = None,
    ) -> RefLogpCache:
        """:meth:`build` with the batches sharded over the ranks of ``torch.distributed`` (``group``: default group).

        Every rank runs ``compute_fn`` over its own ``batches`` (under ZeRO-3 / FSDP2 every rank must run the same
        number of forwards: give each rank equally many batches, as ``accelerate``'s ``even_batches`` does -- a pair
        seen twice keeps its first value); the ``(key, chosen, rejected)`` rows are all-gathered
        (``all_gather_object``), rank 0 (of ``group``) builds the cache and saves it to ``path`` -- once,
        atomically, checksummed -- and after a barrier every rank returns :meth:`load` of that file (checked against
        ``model_hash`` and ``settings``). Without an initialized process group this is :meth:`build` + :meth:`save`.
        """
        import torch.distributed as dist

        keys: list[str] = []
        rows: list[torch.Tensor] = []
        for batch in batches:
            batch_keys, pair_values = _batch_rows(compute_fn, batch)
            keys.extend(batch_keys)
            rows.append(pair_values)
        local = (keys, torch.cat(rows) if rows else torch.zeros(0, 2))
        distributed = dist.is_available() and dist.is_initialized()
        shards: list[Any] = [local]
        if distributed:
            shards = [None] * dist.get_world_size(group)
            dist.all_gather_object(shards, local, group=group)
        main = not distributed or dist.get_rank(group) == 0
        if main:
            all_keys, all_values = cls._dedup(
                [k for shard in shards for k in shard[0]], torch.cat([shard[1] for shard in shards])
            )
            cls(all_keys, all_values, model_hash=model_hash, settings=settings).save(path)
        if distributed:
            dist.barrier(group=group)
        return cls.load(path, model_hash=model_hash, settings=settings)

    @staticmethod
    def _dedup(keys: Sequence[str], values: torch.Tensor) -> tuple[list[str], torch.Tensor]:
        """``keys`` without repeats (first occurrence kept) and their ``[N, 2]`` value rows."""
        first: dict[str, int] = {}
        for i, key in enumerate(keys):
            first.setdefault(key, i)
        idx = torch.tensor(list(first.values()), dtype=torch.long)
        return list(first), values.index_select(0, idx) if len(idx) else values[:0]

    def values_for(self, keys: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(chosen [N], rejected [N])`` fp32 CPU reference log-probs of the pairs with these ``keys``
        (:func:`pair_keys`); ``ValueError`` naming the first key not in the cache."""
        idx = []
        for key in keys:
            j = self._index.get(key)
            if j is None:
                raise ValueError(
                    f"pair key {key} is not in the reference cache ({len(self)} pairs, data fingerprint "
                    f"{self.data_hash[:16]}…)"
                )
            idx.append(j)
        vals = self.values[torch.tensor(idx, dtype=torch.long)] if idx else torch.zeros(0, 2)
        return vals[:, 0].clone(), vals[:, 1].clone()

    def check(self, **expected: Unpack[CacheExpectations]) -> None:
        """Raise ``ValueError`` unless the cache was made for this reference model / dataset / settings.

        Each of the checks (:class:`CacheExpectations`) runs only when its argument is given: ``model``
        (fingerprinted with :func:`model_fingerprint`, ``exclude_adapters`` as there) or ``model_hash``;
        ``data_hash`` or ``batches`` (collated batches of the dataset); ``settings``. ``TypeError`` for another
        keyword.
        """
        check_keywords("RefLogpCache.check()", expected, CacheExpectations.__annotations__, "the checks")
        model, model_hash = expected.get("model"), expected.get("model_hash")
        data_hash, batches, settings = expected.get("data_hash"), expected.get("batches"), expected.get("settings")
        if model is not None:
            model_hash = model_fingerprint(model, exclude_adapters=expected.get("exclude_adapters", False))
        if model_hash is not None and model_hash != self.model_hash:
            raise ValueError(
                f"reference cache was made for another model (cache model fingerprint {self.model_hash[:16]}…, "
                f"this reference model {model_hash[:16]}…); rebuild it with DPOEngine.precompute_reference"
            )
        if batches is not None:
            data_hash = dataset_fingerprint(k for batch in batches for k in pair_keys(batch))
        if data_hash is not None and data_hash != self.data_hash:
            raise ValueError(
                f"reference cache was made for another dataset (cache data fingerprint {self.data_hash[:16]}…, "
                f"this dataset {data_hash[:16]}…): different rows, tokenizer or truncation settings; rebuild it"
            )
        if settings is not None:
            wanted = _normalize_settings(settings)
            if wanted != self.settings:
                raise ValueError(
                    f"reference cache was made with settings {self.settings}, the engine uses {wanted}; rebuild it"
                )

    def lookup(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference ``(chosen_logps [P], rejected_logps [P])`` fp32 for a collated batch, on its device.

        Raises ``ValueError`` naming the first pair that is not in the cache.
        """
        keys = pair_keys(batch)
        idx = []
        for i, key in enumerate(keys):
            j = self._index.get(key)
            if j is None:
                raise ValueError(
                    f"pair {i} of the batch (key {key}) is not in the reference cache ({len(self)} pairs, data "
                    f"fingerprint {self.data_hash[:16]}…): the cache was built for another dataset, tokenizer or "
                    "truncation setting"
                )
            idx.append(j)
        vals = self.values[torch.tensor(idx, dtype=torch.long)] if idx else torch.zeros(0, 2)
        device = batch["input_ids"].device
        return vals[:, 0].to(device), vals[:, 1].to(device)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the cache to ``path`` atomically and checksummed (:func:`fastdpo.atomic.save_checksummed`)."""
        save_checksummed(
            path,
            {
                "format": CACHE_FORMAT,
                "model_hash": self.model_hash,
                "data_hash": self.data_hash,
                "settings": self.settings,
                "keys": self.keys,
                "values": self.values,
            },
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str], **expected: Unpack[CacheExpectations]) -> RefLogpCache:
        """Read a cache written by :meth:`save` and :meth:`check` it against the ``expected`` model/dataset/settings
        (:class:`CacheExpectations`).

        ``FileNotFoundError`` when ``path`` does not exist; ``ValueError`` naming ``path`` when it is not a fastdpo
        reference cache, misses fields, is of the old unchecksummed format, or is damaged
        (:class:`fastdpo.atomic.CorruptFileError`: empty, truncated, or its content does not match its checksum).
        """
        check_keywords("RefLogpCache.load()", expected, CacheExpectations.__annotations__, "the checks")
        name = os.fspath(path)
        what = f"fastdpo reference cache ({CACHE_FORMAT})"
        try:
            payload = read_dict(path, what=what)
        except CorruptFileError as err:
            raise CorruptFileError(f"{err}; rebuild it with DPOEngine.precompute_reference") from None
        fmt = payload.get("format")
        if fmt in _OLD_FORMATS:
            raise ValueError(
                f"{name!r} is a reference cache of the old format {fmt!r}, written without a checksum, so its values "
                "cannot be verified and it is not used; rebuild it with DPOEngine.precompute_reference"
            )
        if fmt != CACHE_FORMAT:
            raise ValueError(
                f"{name!r} is not a fastdpo reference cache ({CACHE_FORMAT}): its 'format' entry is {fmt!r}"
            )
        try:
            payload = verify_checksum(payload, path, what=what)
        except CorruptFileError as err:
            raise CorruptFileError(f"{err}; rebuild it with DPOEngine.precompute_reference") from None
        missing = [k for k in _FIELDS if k not in payload]
        if missing:
            raise ValueError(f"reference cache {name!r} lacks the field(s) {missing}; rebuild it")
        keys, values = payload["keys"], payload["values"]
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise ValueError(f"reference cache {name!r}: 'keys' must be a list of strings")
        if (
            not isinstance(values, torch.Tensor)
            or values.dim() != 2
            or values.shape[1] != 2
            or values.shape[0] != len(keys)
            or not values.is_floating_point()
        ):
            raise ValueError(
                f"reference cache {name!r}: 'values' must be a float [{len(keys)}, 2] tensor, got "
                f"{getattr(values, 'shape', type(values).__name__)}"
            )
        if not isinstance(payload["settings"], dict) or not isinstance(payload["model_hash"], str):
            raise ValueError(f"reference cache {name!r}: 'settings' must be a dict and 'model_hash' a string")
        cache = cls(keys, values, model_hash=payload["model_hash"], settings=payload["settings"])
        if cache.data_hash != payload["data_hash"]:
            raise ValueError(f"reference cache {name!r} is corrupt: its keys do not match its data hash")
        cache.check(**expected)
        return cache
