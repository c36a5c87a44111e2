"""One rank of ``tests/test_sharded_engine.py``: :class:`fastdpo.DPOEngine` steps under DeepSpeed ZeRO-3 and FSDP2
on 2 CPU processes (gloo; DeepSpeed's CPU accelerator), one launch for every scenario::

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/sharded_engine_worker.py --out DIR \\
        --jobs zero3:base,tied,lora_head,gif_ld_wpo,... fsdp2_accelerate:base,... fsdp2_lm_head:base

Every rank builds the same seeded tiny Llama (:mod:`fastdpo.tiny`), takes pairs ``[2R, 2R+1]`` of :data:`ROWS`, runs
one ``DPOEngine.step`` through the sharded policy (the reference as the scenario says), one backward, reads the
full gradients, takes one SGD step and reads the full parameters. ``DIR/rank{R}.pt`` holds, per ``mode`` and
``scenario``: ``{"loss": float, "metrics": {name: float}, "grads": {name: full fp32}, "params": {name: full fp32
after SGD}, "head_gathers": {"forward": int, "backward": int}, "head_gathers_first": same, ...}`` (or ``{"error",
"traceback"}``): the gradients and parameters are those of the first step; ``head_gathers`` counts a second step
(the steady state), ``head_gathers_first`` the first; ``trainable_before`` / ``trainable_after``: the names of the
parameters requiring grad before the first and after the second step; scenario ``base`` adds the reference's
fingerprint and a sharded ``precompute_reference`` (see :func:`_reference_cache`). The test process
computes the same step without any sharding on each rank's shard (:func:`single_shard_result`) and compares: the
loss of each rank equals its shard's, and the (averaged) gradient is the mean of the two shards' gradients.

Modes:

* ``zero3``: ``deepspeed.initialize`` with ZeRO stage 3, every parameter partitioned
  (``stage3_param_persistence_threshold: 0``); a separate reference model goes through its own ZeRO-3 inference
  engine, as TRL's ``prepare_deepspeed`` makes it. ``head_gathers`` counts the all-gathers of the policy's
  ``lm_head.weight`` (transitions out of ``NOT_AVAILABLE``) during ``step`` and during ``backward``.
* ``zero3_hpz`` / ``zero3_offload``: the same with ZeRO++ hierarchical partitioning (``zero_hpz_partition_size``)
  / with parameters and optimizer state offloaded (``offload_param``/``offload_optimizer`` to ``cpu``).
* ``fsdp2_accelerate``: accelerate's own ``fsdp2_prepare_model`` layout (decoder layers, the embedding and the
  ``[final norm, lm_head]`` tail sharded separately, the tail with ``reshard_after_forward=False``, root last) --
  what ``fsdp_version: 2`` builds on a GPU machine, here on a CPU mesh.
* ``fsdp2_lm_head``: ``fully_shard`` on the decoder layers, on the head's linear layer alone (resharded after
  forward: the fused head sees the sharded ``DTensor`` weight; with a LoRA head its adapter factors belong to the
  root, unsharded after forward -- a mixed Tensor/DTensor head) and on the root.

For FSDP2 ``head_gathers`` counts all-gathers that include the head weight (FSDP2 group unshards holding it, and
fastdpo's ``DTensor`` gather).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

MODES = ("zero3", "zero3_hpz", "zero3_offload", "fsdp2_accelerate", "fsdp2_lm_head")
#: ZeRO-3 options of the zero3* modes on top of full partitioning
ZERO3_OPTIONS: dict[str, dict[str, Any]] = {
    "zero3": {},
    "zero3_hpz": {"zero_hpz_partition_size": 2},  # ZeRO++ hierarchical partitioning (secondary partitions)
    "zero3_offload": {"offload_param": {"device": "cpu"}, "offload_optimizer": {"device": "cpu"}},
}
BETA = 0.5
LR = 0.5
CHUNK = 64  # vocabulary tile of the fused head: V=384 -> 6 tiles, so a per-tile gather would show in the counts


def scenario_config(name: str) -> dict[str, Any]:
    """Engine/model options of a scenario name (``loss:<type>`` and ``gif_loss:<type>`` for every loss type)."""
    base: dict[str, Any] = dict(
        tied=False,
        lora=None,
        reference="model",
        loss_type="sigmoid",
        grad_in_forward=False,
        ld_alpha=None,
        use_weighting=False,
        packing="pad",
        label_smoothing=0.0,
    )
    if name.startswith(("loss:", "gif_loss:")):
        loss_type = name.split(":", 1)[1]
        return {
            **base,
            "loss_type": loss_type,
            "grad_in_forward": name.startswith("gif_"),
            "label_smoothing": 1e-3 if loss_type == "exo_pair" else 0.0,
        }
    table = {
        "base": {},
        "tied": {"tied": True, "packing": "prefix_shared"},
        "padding_free": {"packing": "padding_free"},
        "lora": {"lora": "body", "reference": "adapter", "packing": "padding_free"},
        "lora_head": {"lora": "head", "reference": "adapter", "tied": False},
        "gif_ld_wpo": {"grad_in_forward": True, "ld_alpha": 0.5, "use_weighting": True, "packing": "prefix_shared"},
        "ld_wpo": {"ld_alpha": 0.5, "use_weighting": True},
        "gif_lora_tied": {"grad_in_forward": True, "lora": "body", "reference": "adapter", "tied": True},
        "qlora": {"lora": "qlora", "reference": "adapter"},  # 4-bit bitsandbytes base + LoRA, adapter-off reference
    }
    if name not in table:
        raise SystemExit(f"unknown scenario {name!r}")
    return {**base, **table[name]}


ROWS = [
    {"prompt": "the cat sat on", "chosen": " the mat today", "rejected": " under a big red car"},
    {"prompt": "one two", "chosen": " three four five", "rejected": " six"},
    {"prompt": "alpha beta gamma delta", "chosen": " epsilon", "rejected": " zeta eta theta iota"},
    {"prompt": "red", "chosen": " green blue", "rejected": " yellow green blue purple"},
]


DEVICE = torch.device("cpu")  # the worker's --device (cuda: tests/test_sharded_gpu.py)


def build(cfg: dict[str, Any], seed: int = 0) -> tuple[nn.Module, nn.Module | None, Any]:
    """``(policy, reference or None, tokenizer)``: the tiny Llama (tied or not; a 4-bit base for QLoRA), LoRA
    adapters per the scenario (randomly initialised B, so the adapter-off reference differs from the policy), a
    perturbed frozen reference."""
    from helpers import perturbed_reference

    from fastdpo.tiny import make_model, make_tokenizer

    tok = make_tokenizer()
    policy = make_model("llama", tok, attn_implementation="eager", seed=seed)
    if cfg["lora"] == "qlora":  # QLoRA: the frozen base in bitsandbytes 4-bit (dense embedding and head)
        from fastdpo.models import quantize_model

        policy = quantize_model(policy.to(DEVICE), 4)
    policy = policy.to(DEVICE)
    if cfg["tied"]:
        policy.config.tie_word_embeddings = True
        policy.lm_head.weight = policy.model.embed_tokens.weight
    ref = None
    if cfg["reference"] == "model":
        ref = perturbed_reference(policy, seed=seed + 1)
    if cfg["lora"] is not None:
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "v_proj", "up_proj"] + (["lm_head"] if cfg["lora"] == "head" else [])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 7)
            policy = get_peft_model(
                policy, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, init_lora_weights=False)
            )
    policy.train()
    return policy, ref, tok


def engine_for(policy: nn.Module, ref: nn.Module | None, cfg: dict[str, Any]) -> Any:
    from fastdpo import DPOEngine

    return DPOEngine(
        policy,
        ref,
        reference=cfg["reference"],
        loss_type=cfg["loss_type"],
        beta=BETA,
        label_smoothing=cfg["label_smoothing"],
        grad_in_forward=cfg["grad_in_forward"],
        ld_alpha=cfg["ld_alpha"],
        use_weighting=cfg["use_weighting"],
        vocab_tile=CHUNK,
    )


def shard_batch(tok: Any, cfg: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    from fastdpo import PreferenceCollator

    per = len(ROWS) // world
    batch = PreferenceCollator(tok, packing=cfg["packing"])(ROWS[rank * per : (rank + 1) * per])
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(_strip(n), p) for n, p in model.named_parameters() if p.requires_grad]


def _strip(name: str) -> str:
    return name[len("module.") :] if name.startswith("module.") else name


def single_shard_result(scenario: str, rank: int, world: int = 2) -> dict[str, Any]:
    """The unsharded step on rank ``rank``'s shard: loss, metrics and gradients (the test's reference)."""
    cfg = scenario_config(scenario)
    policy, ref, tok = build(cfg)
    engine = engine_for(policy, ref, cfg)
    loss, metrics = engine.step(shard_batch(tok, cfg, rank, world))
    loss.backward()
    grads = {n: p.grad.detach().float().cpu().clone() for n, p in _trainable(policy) if p.grad is not None}
    params = {n: p.detach().float().cpu().clone() for n, p in _trainable(policy)}
    return {
        "loss": float(loss.detach()),
        "metrics": {k: float(v) for k, v in metrics.items()},
        "grads": grads,
        "params": params,
    }


# ------------------------------------------------------------------------------------------------- ZeRO-3
def _zero3_gather_counter(param: nn.Parameter) -> dict[str, int]:
    """Count ZeRO-3 all-gathers of ``param``: every transition of its ``ds_status`` out of ``NOT_AVAILABLE``
    (the coordinator's fetches, ``GatheredParameters``, any ``param.all_gather()``)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    counts = {"n": 0}
    base = type(param)

    class Watched(base):  # type: ignore[misc, valid-type]
        def __setattr__(self, name: str, value: Any) -> None:
            if (
                name == "ds_status"
                and value != ZeroParamStatus.NOT_AVAILABLE
                and getattr(self, "ds_status", None) == ZeroParamStatus.NOT_AVAILABLE
            ):
                counts["n"] += 1
            super().__setattr__(name, value)

    param.__class__ = Watched
    return counts


class _WeightSizedAllocations(TorchDispatchMode):
    """Records the new tensors of at least ``numel`` elements (fresh storage, not views or in-place results)
    allocated inside the LM head's module call (ZeRO's gather included: the window opens before ZeRO's pre-forward
    hook and closes after its post-forward release) and inside the fused head's backward: ``records`` is a list of
    ``(phase, op, shape)``."""

    def __init__(self, numel: int, head: nn.Module) -> None:
        super().__init__()
        self.numel, self.records, self.phase = numel, [], None
        self._handles = [
            head.register_forward_pre_hook(lambda *_: self._open("forward"), prepend=True),
            head.register_forward_hook(lambda *_: self._close()),
        ]
        from fastdpo.head.function import _LinearLogprobs

        self._fn, self._backward = _LinearLogprobs, _LinearLogprobs.backward
        audit = self

        def backward(ctx: Any, *grads: torch.Tensor) -> Any:
            audit._open("backward")
            try:
                return audit._backward(ctx, *grads)
            finally:
                audit._close()

        _LinearLogprobs.backward = staticmethod(backward)

    def _open(self, phase: str) -> None:
        self.phase = phase

    def _close(self) -> None:
        self.phase = None

    def __exit__(self, *exc: Any) -> Any:
        for h in self._handles:
            h.remove()
        self._fn.backward = staticmethod(self._backward)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if self.phase is not None:
            inputs = {
                t.untyped_storage().data_ptr()
                for t in tree_leaves((args, kwargs))
                if isinstance(t, torch.Tensor) and t.device.type != "meta"
            }
            for t in tree_leaves(out):
                if (
                    isinstance(t, torch.Tensor)
                    and t.numel() >= self.numel
                    and t.untyped_storage().data_ptr() not in inputs
                ):
                    self.records.append((self.phase, str(func), tuple(t.shape)))
        return out


def run_zero3(scenario: str, rank: int, world: int, mode: str = "zero3") -> dict[str, Any]:
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    cfg = scenario_config(scenario)
    policy, ref, tok = build(cfg)
    zero = {
        "stage": 3,
        "stage3_param_persistence_threshold": 0,
        "reduce_bucket_size": 20_000,
        "allgather_bucket_size": 20_000,
        "stage3_prefetch_bucket_size": 0,
        **ZERO3_OPTIONS[mode],
    }
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "gradient_clipping": 0.0,
        "zero_force_ds_cpu_optimizer": False,
    }
    trainable = [p for p in policy.parameters() if p.requires_grad]
    ds_policy, *_ = deepspeed.initialize(model=policy, optimizer=torch.optim.SGD(trainable, lr=LR), config=config)
    if ref is not None:  # as TRL's prepare_deepspeed: a ZeRO-3 inference engine, no optimizer
        ref_zero = {k: v for k, v in zero.items() if k != "offload_optimizer"}
        ref, *_ = deepspeed.initialize(model=ref, config={**config, "zero_optimization": ref_zero})
        ref.eval()
    engine = engine_for(policy, ref, cfg)
    head = engine.policy_parts.head
    weight = getattr(head, "base_layer", head).weight
    # 0 elements outside the gather; each rank holds a 1/world partition
    sharded = (
        hasattr(weight, "ds_id")
        and weight.numel() == 0
        and weight.ds_tensor.numel() * world >= weight.ds_numel
        and (world == 1 or weight.ds_tensor.numel() < weight.ds_numel)
    )
    counter = _zero3_gather_counter(weight)
    trainable_before = sorted(n for n, _ in _trainable(policy))
    audit = _WeightSizedAllocations(weight.ds_numel, head) if scenario == "base" else None
    batch = shard_batch(tok, cfg, rank, world)
    out: dict[str, Any] = {}
    for step in range(2):  # the second step shows the steady state (ZeRO records its prefetch trace in the first)
        start = counter["n"]
        with audit if audit is not None and step == 0 else contextlib.nullcontext():
            loss, metrics = engine.step(batch, ds_policy)
            forward_gathers = counter["n"] - start
            ds_policy.backward(loss)
        gathers = {"forward": forward_gathers, "backward": counter["n"] - start - forward_gathers}
        if step == 0:
            grads = {}
            for name, p in _trainable(policy):
                g = safe_get_full_grad(p)
                if g is not None:
                    grads[name] = g.detach().float().cpu().clone()
            ds_policy.step()
            params = {}
            for name, p in _trainable(policy):
                with deepspeed.zero.GatheredParameters([p]):
                    params[name] = p.detach().float().cpu().clone()
            out = {
                "loss": float(loss.detach()),
                "metrics": {k: float(v) for k, v in metrics.items()},
                "grads": grads,
                "params": params,
                "head_gathers_first": gathers,
                "sharded": sharded,
                "allocations": None if audit is None else audit.records,
            }
        else:
            ds_policy.step()
            out["head_gathers"] = gathers
    out["trainable_before"] = trainable_before
    out["trainable_after"] = sorted(n for n, _ in _trainable(policy))
    out.update(_reference_cache(engine, batch, scenario))
    return out


# ------------------------------------------------------------------------------------------------- FSDP2
_FSDP2_COUNT: dict[str, Any] = {"owner": None, "n": 0}


def _install_fsdp2_gather_counter() -> None:
    """Count (in ``_FSDP2_COUNT``) all-gathers that include ``_FSDP2_COUNT["owner"].weight``: FSDP2 group unshards
    holding it and fastdpo's DTensor gathers of it."""
    import torch.distributed.fsdp._fully_shard._fsdp_param_group as group_mod

    from fastdpo.head.gather import _GatherDTensor

    if getattr(group_mod.foreach_all_gather, "_counting", False):
        return
    original = group_mod.foreach_all_gather

    def counting(fsdp_params: list[Any], *args: Any, **kwargs: Any) -> Any:
        owner = _FSDP2_COUNT["owner"]

        def holds_head(fp: Any) -> bool:  # a tied weight is owned by the embedding, the head shares it
            info = fp._module_info
            pairs = [(info.module, info.param_name), *zip(info.shared_modules, info.shared_param_names)]
            return any(m is owner and n == "weight" for m, n in pairs)

        if any(holds_head(fp) for fp in fsdp_params):
            _FSDP2_COUNT["n"] += 1
        return original(fsdp_params, *args, **kwargs)

    counting._counting = True  # type: ignore[attr-defined]
    group_mod.foreach_all_gather = counting
    original_forward = _GatherDTensor.forward

    def gather_forward(ctx: Any, weight: torch.Tensor) -> torch.Tensor:
        if weight is getattr(_FSDP2_COUNT["owner"], "weight", None):
            _FSDP2_COUNT["n"] += 1
        return original_forward(ctx, weight)

    _GatherDTensor.forward = staticmethod(gather_forward)


def _accelerate_fsdp2(model: nn.Module, rank: int) -> nn.Module:
    """accelerate's ``fsdp2_prepare_model`` on a CPU mesh (the layout ``fsdp_version: 2`` builds)."""
    from types import SimpleNamespace

    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
        reshard_after_forward=True,
        cpu_ram_efficient_loading=False,
        state_dict_type="FULL_STATE_DICT",
    )
    accelerator = SimpleNamespace(
        state=SimpleNamespace(fsdp_plugin=plugin),
        torch_device_mesh=None,
        mixed_precision="no",
        is_main_process=rank == 0,
        device=DEVICE,
    )
    return fsdp2_prepare_model(accelerator, model)


def _full(t: torch.Tensor) -> torch.Tensor:
    if type(t).__name__ == "DTensor":
        t = t.full_tensor()
    return t.detach().float().cpu().clone()


def run_fsdp2(mode: str, scenario: str, rank: int, world: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from fastdpo.models import unwrap_peft

    cfg = scenario_config(scenario)
    policy, ref, tok = build(cfg)
    hf = unwrap_peft(policy)
    head = hf.get_output_embeddings()
    head_owner = getattr(head, "base_layer", head)
    mesh = init_device_mesh(DEVICE.type, (world,))
    if mode == "fsdp2_accelerate":
        policy = _accelerate_fsdp2(policy, rank)
    else:
        for layer in hf.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(head_owner, mesh=mesh, reshard_after_forward=True)
        fully_shard(policy, mesh=mesh)
    if ref is not None:  # as TRL's prepare_fsdp: the root sharded
        fully_shard(ref, mesh=mesh)
    sharded = all(type(p).__name__ == "DTensor" for p in head_owner.parameters())
    trainable_before = sorted(n for n, _ in _trainable(policy))
    _install_fsdp2_gather_counter()
    _FSDP2_COUNT.update(owner=head_owner, n=0)
    engine = engine_for(policy, ref, cfg)
    batch = shard_batch(tok, cfg, rank, world)
    opt = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=LR)
    out: dict[str, Any] = {}
    for step in range(2):
        start = _FSDP2_COUNT["n"]
        loss, metrics = engine.step(batch)
        forward_gathers = _FSDP2_COUNT["n"] - start
        loss.backward()
        gathers = {"forward": forward_gathers, "backward": _FSDP2_COUNT["n"] - start - forward_gathers}
        if step == 0:
            grads = {n: _full(p.grad) for n, p in _trainable(policy) if p.grad is not None}
            opt.step()
            out = {
                "loss": float(loss.detach()),
                "metrics": {k: float(v) for k, v in metrics.items()},
                "grads": grads,
                "params": {n: _full(p) for n, p in _trainable(policy)},
                "head_gathers_first": gathers,
                "sharded": sharded,
            }
        else:
            opt.step()
            out["head_gathers"] = gathers
        opt.zero_grad()
    out["trainable_before"] = trainable_before
    out["trainable_after"] = sorted(n for n, _ in _trainable(policy))
    out.update(_reference_cache(engine, batch, scenario))
    return out


def _reference_cache(engine: Any, batch: dict[str, Any], scenario: str) -> dict[str, Any]:
    """``base`` scenario: the reference's fingerprint (the unsharded model's, gathered) and a
    ``precompute_reference`` of this rank's shard into one file (``OUT/<mode>-ref.pt``, written by rank 0)."""
    if scenario != "base":
        return {}
    from fastdpo.ref_cache import RefLogpCache

    path = Path(_OUT) / f"{_MODE}-ref.pt"
    cache = engine.precompute_reference([batch], path)
    on_disk = RefLogpCache.load(path)
    return {
        "ref_fingerprint": engine.reference_fingerprint(),
        "ref_cache_pairs": len(cache),
        "ref_cache_values": on_disk.values.clone(),
        "ref_cache_keys": list(on_disk.keys),
        "ref_cache_tmp_files": sorted(p.name for p in Path(_OUT).iterdir() if p.name.endswith(".tmp")),
    }


_OUT, _MODE = ".", ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for rank{R}.pt")
    parser.add_argument("--jobs", nargs="+", required=True, help="MODE:SCENARIO[,SCENARIO...]")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import torch.distributed as dist
    from launch import outcome, saving_results

    global DEVICE, _OUT, _MODE
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        DEVICE = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", timeout=timedelta(seconds=120))
    results: dict[str, dict[str, Any]] = {}
    with saving_results(results, args.out, rank):
        for job in args.jobs:
            mode, scenarios = job.split(":", 1)
            if mode not in MODES:
                raise SystemExit(f"unknown mode {mode!r}; choose from {MODES}")
            results.setdefault(mode, {})
            for scenario in scenarios.split(","):
                _OUT, _MODE = args.out, mode
                if mode.startswith("zero3"):
                    results[mode][scenario] = outcome(lambda: run_zero3(scenario, rank, world, mode))
                else:
                    results[mode][scenario] = outcome(lambda: run_fsdp2(mode, scenario, rank, world))
                dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
