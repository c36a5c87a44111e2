"""One rank of the sequence-parallel tests in ``tests/test_sequence_parallel.py`` (CPU, gloo).

Run one process per rank::

    python tests/sp_worker.py --rank R --world-size W --sp 2 --init-file /tmp/x/init --out /tmp/x \\
        --jobs llama-pad:plain qwen2-prefix_shared:ddp ...

Every rank builds the same seeded tiny model (:mod:`fastdpo.tiny`), policy and perturbed frozen reference, and the same
collated batch of a case; data-parallel rank ``rank // sp`` keeps its contiguous share of the pairs (all of them when
``W == sp``), so every rank of a sequence-parallel group holds the same batch. One DPO step runs through
``DPOEngine(sequence_parallel_size=sp)`` under a mode:

* ``plain``: no wrapper; ``engine.reduce_sequence_parallel_gradients()`` after backward (``W == sp`` only);
* ``ddp``: ``DistributedDataParallel`` over all ``W`` ranks;
* ``fsdp2``: ``fully_shard`` per decoder layer and on the root, over a 1-D mesh of all ``W`` ranks;
* ``hsdp``: the same over a 2-D ``("dp", "sp")`` mesh (FSDP2 shards within a sequence-parallel group, replicates
  across them), the engine's group given as that mesh;
* ``nosync``: no wrapper and no reduction call (the raw per-rank gradients, to show the comparison can fail);
* ``mismatch``: rank ``1`` of each group gets a different batch (the engine must refuse it on every rank);
* ``ddp_subgroup``: ``DistributedDataParallel`` over each rank alone (the engine must refuse it).

The job ``sum_over_group:grad`` checks :func:`fastdpo.sequence_parallel.sum_over_group`'s gradient convention.

Rank ``R`` writes ``rank{R}.pt``: ``{job: {"loss", "chosen", "rejected" (fp64 lists), "metrics" {name: float},
"grads" {name: fp32 full gradient}, "batch": the case's full collated batch, "owned": this rank's owned token count}
| {"error", "traceback"}}``; rank 0 adds ``"single:<case>"`` entries: the same step in one process
(``sequence_parallel_size=1``, full batch, no wrapper) -- the reference the test compares against.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

VOCAB_LOW = 5  # token ids drawn from [VOCAB_LOW, V): no special tokens inside the rows

# (prompt, chosen, rejected) token counts per pair. With sp=2:
# "pad": rows of 19 (odd) columns -> shards of 10; pair 1's chosen row (3+4 tokens) leaves shard 1 pure padding;
#   pair 2 has an empty prompt (its first completion token is not scored); long rows cross the boundary.
# packed: 2 rows (max_tokens_per_row) of odd length; sequences cross the middle column.
LENGTHS = {
    "pad": [(7, 12, 5), (3, 4, 16), (0, 9, 6), (5, 8, 3)],
    "padding_free": [(5, 6, 3), (4, 2, 7), (3, 5, 4), (2, 3, 3)],
    "prefix_shared": [(5, 6, 3), (4, 2, 7), (6, 5, 4), (3, 2, 3)],
}
ROW_CAP = {"pad": None, "padding_free": 22, "prefix_shared": 17}

# case name -> settings; every arch x packing, plus a batch whose whole second half is padding
CASES: dict[str, dict[str, Any]] = {}
for _arch in ("llama", "qwen2", "gemma2"):
    for _packing in ("pad", "padding_free", "prefix_shared"):
        CASES[f"{_arch}-{_packing}"] = {"arch": _arch, "packing": _packing}
CASES["llama-prefix_shared-allpad"] = {"arch": "llama", "packing": "prefix_shared", "pad_to_multiple_of": 48}
CASES["llama-pad-ckpt"] = {"arch": "llama", "packing": "pad", "gradient_checkpointing": True}
# one key/value head for 4 query heads: replicated to one per rank before the all-to-all
CASES["llama-mqa-prefix_shared"] = {"arch": "llama", "packing": "prefix_shared", "kv_heads": 1}
# a PEFT LoRA policy whose reference is the same model with the adapter disabled
CASES["llama-padding_free-lora"] = {"arch": "llama", "packing": "padding_free", "lora": True}
# loss settings by arch: WPO's log sum p^2 statistics, LD-DPO's per-position weights + an SFT term, plain sigmoid
ENGINE_KWARGS = {
    "llama": {"loss_type": "sigmoid", "use_weighting": True},
    "qwen2": {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5], "ld_alpha": 0.5},
    "gemma2": {"loss_type": "ipo"},
}


def sum_over_group_grads(world: int) -> dict[str, Any]:
    """``sum_over_group``'s gradient convention: each rank's addend gets ``k`` times the gradient of *this rank's*
    loss of the sum (no collective in backward; the engine's losses are identical on every rank, so the group mean is
    the single-process gradient). Rank-dependent loss weights tell it apart from an autograd all-reduce, whose
    backward would hand every rank the sum of all ranks' gradients."""
    from fastdpo.sequence_parallel import sum_over_group

    rank = dist.get_rank()
    x = (torch.arange(5, dtype=torch.float64) + 10 * rank).requires_grad_(True)
    weights = torch.tensor([1.0, -2.0, 3.0, 0.5, 4.0], dtype=torch.float64) * (rank + 1)
    total = sum_over_group(x, dist.group.WORLD, world)
    (total * weights).sum().backward()
    return {"sum": total.detach().tolist(), "grad": x.grad.tolist()}


def saved_bytes_job(spec: str, sp: int) -> dict[str, Any]:
    """``PRESET-DTYPE-PACKING`` (e.g. ``Llama-3.2-1B-fp32-prefix_shared``): the estimator's per-rank numbers
    (:mod:`fastdpo.sp_memory`) next to what this rank's engine forward really saves for backward
    (``saved_tensors_hooks``, distinct storages, parameters / batch / masks excluded), the bytes of the masks it
    builds and the scored tokens it owns, on a tiny model of the preset's architecture."""
    from helpers import saved_bytes

    from fastdpo import DPOEngine, PreferenceCollator, sp_memory
    from fastdpo import memory as M
    from fastdpo.benchmarks.memory_measure import build_models
    from fastdpo.tiny import id_tokenizer

    preset, dtype, packing = spec.rsplit("-", 2)
    # Qwen: 4 key/value heads for 8 query heads, 2 per rank (transformers copies them when it repeats them)
    heads, kv_heads = (8, 4) if preset.startswith("Qwen") else (4, 2)
    cfg = dict(
        M.PRESETS[preset],
        vocab_size=997,
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=64 // heads,
        num_hidden_layers=2,
    )
    shape = M.shape_from_config(cfg, preset)
    step = M.StepConfig(
        pairs=3,
        prompt_len=9,
        completion_len=6,
        dtype=dtype,
        device="cpu",
        packing=packing,
        pairs_per_row=2 if packing == "prefix_shared" else 1,
        sequence_parallel=sp,
    )
    torch.manual_seed(0)
    _, model, _ = build_models({"dtype": dtype, "reference": "precomputed"}, cfg, None)
    gen = torch.Generator().manual_seed(1)

    def ids(n: int) -> list[int]:
        return torch.randint(0, 997, (n,), generator=gen).tolist()

    rows = [
        {
            "prompt_input_ids": ids(9),
            "chosen_input_ids": ids(6),
            "rejected_input_ids": ids(6),
            "ref_chosen_logps": 0.0,
            "ref_rejected_logps": 0.0,
        }
        for _ in range(step.pairs)
    ]
    if packing == "prefix_shared":
        collator = PreferenceCollator(id_tokenizer(997), packing=packing, max_tokens_per_row=2 * (9 + 12))
    else:
        collator = PreferenceCollator(id_tokenizer(997), packing="pad")
    batch = collator(rows)
    engine = DPOEngine(model, reference="precomputed", sequence_parallel_size=sp)
    shard = engine.sequence_parallel.shard(batch, model)
    masks = shard.attention_kwargs.get("attention_mask")
    masks = [m for m in (masks.values() if isinstance(masks, dict) else [masks]) if m is not None]
    exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}
    exclude |= {
        t.untyped_storage().data_ptr()
        for t in (*batch.values(), *masks, shard.input_ids, shard.position_ids)
        if isinstance(t, torch.Tensor)
    }
    saved = saved_bytes(lambda: engine.policy_parts.forward(shard.input_ids, **shard.forward_kwargs()), exclude)
    return {
        "saved": saved,
        "estimate": sp_memory.activation_bytes(shape, step),
        "mask": sum(m.untyped_storage().nbytes() for m in masks),
        "mask_estimate": sp_memory.mask_bytes(shape, step),
        "owned": int(shard.owned.numel()),
        "owned_estimate": sp_memory.owned_tokens(step)[dist.get_rank()],
        "eager": shape.eager_attention,
        "shape": tuple(batch["input_ids"].shape),
    }


def case_rows(case: str, vocab: int) -> list[dict[str, list[int]]]:
    """The case's pre-tokenized preference rows (seeded)."""
    gen = torch.Generator().manual_seed(11)
    rows = []
    for lengths in LENGTHS[CASES[case]["packing"]]:
        ids = [torch.randint(VOCAB_LOW, vocab, (n,), generator=gen).tolist() for n in lengths]
        rows.append({"prompt_input_ids": ids[0], "chosen_input_ids": ids[1], "rejected_input_ids": ids[2]})
    return rows


def collate(case: str, tok: Any, rows: list[dict[str, list[int]]]) -> dict[str, Any]:
    from fastdpo import PreferenceCollator

    spec = CASES[case]
    collator = PreferenceCollator(
        tok,
        packing=spec["packing"],
        max_tokens_per_row=ROW_CAP[spec["packing"]],
        pad_to_multiple_of=spec.get("pad_to_multiple_of"),
    )
    return collator(rows)


def build(case: str, dp_rank: int = 0, dp_size: int = 1) -> tuple[Any, Any, dict[str, Any]]:
    """``(policy, reference, collated batch)`` of a case (seeded: identical on every rank); the batch holds the
    pairs of data-parallel rank ``dp_rank`` of ``dp_size`` (a contiguous equal share)."""
    spec = CASES[case]
    from helpers import perturbed_reference

    from fastdpo import tiny

    tok = tiny.make_tokenizer()
    arch = spec["arch"]
    # eager for Gemma 2 (soft-capping); a sliding window small enough to matter for Gemma 2 and Qwen 2
    attn = "eager" if arch == "gemma2" else "sdpa"
    window = 6 if arch != "llama" else None
    if "kv_heads" in spec:
        policy = tiny.make_model(arch, tok, attn_implementation=attn, num_key_value_heads=spec["kv_heads"])
    else:
        policy = tiny.make_model(arch, tok, attn_implementation=attn, sliding_window=window)
    policy.train()
    ref = perturbed_reference(policy, seed=7)
    rows = case_rows(case, len(tok))
    per = len(rows) // dp_size
    return policy, ref, collate(case, tok, rows[dp_rank * per : (dp_rank + 1) * per])


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t.detach().float().clone()


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad and p.grad is not None:
            out[name.removeprefix("module.").removeprefix("base_model.model.")] = _full(p.grad)
    return out


def step(case: str, mode: str, sp: int, rank: int, world: int) -> dict[str, Any]:
    """One DPO step of ``case`` under ``mode`` (``"single"``: one process, full batch)."""
    from fastdpo import DPOEngine

    spec = CASES[case]
    dp_size = 1 if mode == "single" else world // sp
    policy, ref, batch = build(case, rank // sp if dp_size > 1 else 0, dp_size)
    if mode == "mismatch" and rank % sp == 1:  # this rank of the group got another batch: must be refused
        batch = dict(batch, input_ids=batch["input_ids"].roll(1, dims=1))
    model: torch.nn.Module = policy
    group = None  # the engine's default sequence-parallel groups: contiguous ranks
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(policy)
    elif mode == "ddp_subgroup":  # DDP over this rank alone: must be refused (it would not average over the group)
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(policy, process_group=dist.new_subgroups(group_size=1)[0])
    elif mode in ("fsdp2", "hsdp"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if mode == "hsdp":  # parameters sharded within each sequence-parallel group, replicated across them
            mesh = init_device_mesh("cpu", (world // sp, sp), mesh_dim_names=("dp", "sp"))
            group = mesh
        else:
            mesh = init_device_mesh("cpu", (world,))
        for layer in policy.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(policy, mesh=mesh)
    kwargs = dict(
        ENGINE_KWARGS[spec["arch"]], beta=0.1, gradient_checkpointing=bool(spec.get("gradient_checkpointing"))
    )
    if spec.get("lora"):
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(3)
        model = get_peft_model(
            policy,
            LoraConfig(
                r=4,
                lora_alpha=8,
                lora_dropout=0.0,
                init_lora_weights=False,
                target_modules=["q_proj", "v_proj", "up_proj"],
            ),
        )
        ref, kwargs["reference"] = None, "adapter"
    engine = DPOEngine(
        model, ref, sequence_parallel_size=1 if mode == "single" else sp, sequence_parallel_group=group, **kwargs
    )
    loss, metrics = engine.step(batch)
    logps = engine.compute_logps(model, batch, with_grad=False)
    loss.backward()
    if mode == "plain":
        engine.reduce_sequence_parallel_gradients()
    owned = None
    if engine.sequence_parallel is not None:
        owned = int(engine.sequence_parallel.shard(batch, engine.policy_parts.hf_model).owned.numel())
    return {
        "loss": float(loss.detach()),
        "chosen": logps["chosen_logps"].double().tolist(),
        "rejected": logps["rejected_logps"].double().tolist(),
        "metrics": {k: float(v) for k, v in metrics.items()},
        "grads": _grads(model),
        "batch": {k: v for k, v in batch.items()},
        "owned": owned,
        "attn": policy.config._attn_implementation,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--sp", type=int, default=2)
    parser.add_argument("--init-file", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--jobs", nargs="+", required=True, help="CASE:MODE (modes: plain, ddp, fsdp2, nosync)")
    parser.add_argument("--singles", nargs="*", default=[], help="cases rank 0 also runs in one process")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    from launch import init_file_group, outcome, saving_results

    init_file_group(args.init_file, args.rank, args.world_size)
    results: dict[str, Any] = {}
    with saving_results(results, args.out, args.rank):
        for job in args.jobs:
            case, mode = job.split(":")
            if case == "sum_over_group":
                results[job] = outcome(lambda: sum_over_group_grads(args.world_size))
            elif case == "saved":
                results[job] = outcome(lambda: saved_bytes_job(mode, args.sp))
            else:
                results[job] = outcome(lambda: step(case, mode, args.sp, args.rank, args.world_size))
            dist.barrier()
        if args.rank == 0:
            for case in args.singles:
                results[f"single:{case}"] = outcome(lambda: step(case, "single", 1, 0, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
