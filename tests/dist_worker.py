"""One rank of the 2-process gloo tests in ``tests/test_distributed.py`` (CPU, no GPU needed).

Run as a script, one process per rank::

    python tests/dist_worker.py --rank R --world-size 2 --init-file /tmp/x/init --out /tmp/x \\
        --jobs head:ddp,fsdp2,fsdp2_dtensor engine:ddp,fsdp2

Every rank builds the same seeded model and the same full preference batch, takes its own contiguous slice of the
pairs, runs one DPO step under a data-parallel wrapper, and writes ``rank{R}.pt`` into ``--out``:
``{scenario: {mode: {"loss": float, "grads": {name: full fp32 grad}, "params": {name: full param after one SGD
step}} | {"error": str, "traceback": str}, "local_grads": {name: grad of this rank's share, no wrapper}}}``.
The test process computes the single-process result with :func:`single_process_result` (same code, full batch, no
wrapper) and compares.

Scenarios:

- ``head``: a toy LM (embedding + MLP body + bias-free lm-head) whose per-sequence log-probs come from
  :func:`fastdpo.linear_sequence_logprobs` and whose loss is :func:`fastdpo.preference_loss` (sigmoid DPO) against a
  frozen reference copy. Modes: ``ddp`` (``DistributedDataParallel``), ``fsdp2`` (``fully_shard`` on the body and the
  root; the head runs inside the root forward, so FSDP gathers the weight), ``fsdp2_dtensor`` (the body is called on
  its own and the lm-head weight is handed to fastdpo as the sharded ``DTensor`` it is outside a forward, the way an
  engine that calls the backbone and then the fused head sees it).
- ``engine``: a tiny HF causal LM from :mod:`fastdpo.tiny` trained through :class:`fastdpo.DPOEngine` on a batch from
  :class:`fastdpo.PreferenceCollator`. Modes: ``ddp``, ``fsdp2`` (``fully_shard`` per decoder layer + root).

All losses are means over pairs and every rank gets the same number of pairs, so the data-parallel gradient (an
average over ranks for both DDP and FSDP2) equals the single-process full-batch gradient.
"""

from __future__ import annotations

import argparse
import copy
import sys
from typing import Any

import torch
import torch.nn as nn

VOCAB = 61
DIM = 12
SEQ = 9
PROMPT = 4
PAIRS = 4  # split evenly over 2 ranks
BETA = 0.1
LR = 0.5


# ---------------------------------------------------------------------------------------------------------------
# Scenario "head": toy LM + fused head + preference_loss
# ---------------------------------------------------------------------------------------------------------------


class ToyBody(nn.Module):
    """Embedding + 2-layer MLP: ``ids [B, T] int64 -> hidden [B, T, D] fp32``."""

    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(self.embed(ids))))


class ToyLM(nn.Module):
    """``body`` + bias-free ``lm_head``; ``forward(ids, labels) -> per-sequence log-probs [B] fp32`` (fused head)."""

    def __init__(self, vocab: int = VOCAB, dim: int = DIM) -> None:
        super().__init__()
        self.body = ToyBody(vocab, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        from fastdpo import linear_sequence_logprobs

        return linear_sequence_logprobs(self.body(ids), self.lm_head.weight, labels)


def make_head_batch(seed: int = 1234) -> dict[str, torch.Tensor]:
    """``ids [2P, T]`` and ``labels [2P, T]`` (-100 on prompt positions; label t is token t+1), chosen rows first."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, VOCAB, (PAIRS, PROMPT), generator=g)
    comp = torch.randint(0, VOCAB, (2 * PAIRS, SEQ - PROMPT + 1), generator=g)
    seq = torch.cat([prompts.repeat(2, 1), comp], dim=1)  # [2P, SEQ+1]
    ids, labels = seq[:, :-1].clone(), seq[:, 1:].clone()
    labels[:, : PROMPT - 1] = -100
    # ragged completions: pair 1's rejected answer is 2 tokens shorter, pair 2's chosen one 1 token shorter
    labels[PAIRS + 1, -2:] = -100
    labels[2, -1:] = -100
    return {"ids": ids, "labels": labels}


def slice_head_batch(batch: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s contiguous share of the pairs (chosen and rejected rows of the same pairs)."""
    per = PAIRS // world
    pairs = torch.arange(rank * per, (rank + 1) * per)
    rows = torch.cat([pairs, pairs + PAIRS])
    return {k: v[rows] for k, v in batch.items()}


def build_head_models(seed: int = 0) -> tuple[ToyLM, ToyLM]:
    """Policy and frozen reference (a perturbed copy, so that the log-ratios are not all zero)."""
    torch.manual_seed(seed)
    policy = ToyLM()
    ref = copy.deepcopy(policy)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    for p in ref.parameters():
        p.requires_grad_(False)
    return policy, ref


def head_dpo_loss(policy_logps: torch.Tensor, ref: ToyLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sigmoid DPO loss (mean over the batch's pairs) from policy log-probs ``[2p]`` (chosen first)."""
    from fastdpo import preference_loss

    with torch.no_grad():
        ref_logps = ref(batch["ids"], batch["labels"])
    p = policy_logps.shape[0] // 2
    loss, _ = preference_loss(
        policy_logps[:p], policy_logps[p:], ref_logps[:p], ref_logps[p:], loss_type="sigmoid", beta=BETA
    )
    return loss


# ---------------------------------------------------------------------------------------------------------------
# Scenario "engine": tiny HF model + collator + DPOEngine
# ---------------------------------------------------------------------------------------------------------------


ENGINE_ROWS = [
    {"prompt": "the cat sat", "chosen": " on the mat", "rejected": " under a big red car today"},
    {"prompt": "one two", "chosen": " three four five", "rejected": " six"},
    {"prompt": "alpha beta gamma delta", "chosen": " epsilon", "rejected": " zeta eta theta"},
    {"prompt": "red", "chosen": " green blue", "rejected": " yellow green blue purple"},
]


def build_engine_parts(seed: int = 0) -> tuple[nn.Module, nn.Module, Any]:
    """``(policy, reference, tokenizer)``: a tiny Llama from :mod:`fastdpo.tiny` and a perturbed frozen copy."""
    from helpers import perturbed_reference

    from fastdpo import tiny

    tok = tiny.make_tokenizer()
    policy = tiny.make_model("llama", tok, attn_implementation="eager", seed=seed)
    policy.train()
    return policy, perturbed_reference(policy, seed=seed + 1), tok


def engine_batch(tok: Any, rows: list[dict[str, str]]) -> dict[str, Any]:
    from fastdpo import PreferenceCollator

    return PreferenceCollator(tok, packing="pad")(rows)


def engine_loss(policy: nn.Module, ref: nn.Module, tok: Any, rows: list[dict[str, str]]) -> torch.Tensor:
    from fastdpo import DPOEngine

    engine = DPOEngine(policy, ref, loss_type="sigmoid", beta=BETA)
    loss, _ = engine.step(engine_batch(tok, rows))
    return loss


# ---------------------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------------------


def _full(t: torch.Tensor) -> torch.Tensor:
    """Full (unsharded) fp32 copy of a tensor or DTensor."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t.detach().float().clone()


def _strip(name: str) -> str:
    """Parameter name without wrapper prefixes (DDP's ``module.``)."""
    return name[len("module.") :] if name.startswith("module.") else name


def _collect(model: nn.Module, what: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        t = p.grad if what == "grad" else p
        if t is None:
            continue
        out[_strip(name)] = _full(t)
    return out


def single_process_result(scenario: str, seed: int = 0) -> dict[str, Any]:
    """The reference: full batch, one process, no wrapper. Same output layout as one mode of a rank file."""
    if scenario == "head":
        policy, ref = build_head_models(seed)
        batch = make_head_batch()
        loss = head_dpo_loss(policy(batch["ids"], batch["labels"]), ref, batch)
    else:
        policy, ref, tok = build_engine_parts(seed)
        loss = engine_loss(policy, ref, tok, ENGINE_ROWS)
    loss.backward()
    grads = _collect(policy, "grad")
    torch.optim.SGD(policy.parameters(), lr=LR).step()
    return {"loss": float(loss.detach()), "grads": grads, "params": _collect(policy, "param")}


def _local_grads(scenario: str, rank: int, world: int, seed: int) -> dict[str, torch.Tensor]:
    """Gradients of this rank's share computed without any wrapper (what DDP must not leave unreduced)."""
    if scenario == "head":
        policy, ref = build_head_models(seed)
        batch = slice_head_batch(make_head_batch(), rank, world)
        loss = head_dpo_loss(policy(batch["ids"], batch["labels"]), ref, batch)
    else:
        policy, ref, tok = build_engine_parts(seed)
        per = len(ENGINE_ROWS) // world
        loss = engine_loss(policy, ref, tok, ENGINE_ROWS[rank * per : (rank + 1) * per])
    loss.backward()
    return _collect(policy, "grad")


def _wrap(mode: str, policy: nn.Module, scenario: str) -> nn.Module:
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(policy)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    if scenario == "head":
        fully_shard(policy.body, mesh=mesh)
    else:
        for layer in policy.model.layers:
            fully_shard(layer, mesh=mesh)
    fully_shard(policy, mesh=mesh)
    return policy


def run_mode(scenario: str, mode: str, rank: int, world: int, seed: int) -> dict[str, Any]:
    """One DPO step of ``mode`` on this rank's share; returns loss, full grads and full params after SGD."""
    if scenario == "head":
        policy, ref = build_head_models(seed)
        batch = slice_head_batch(make_head_batch(), rank, world)
        wrapped = _wrap(mode, policy, scenario)
        if mode == "fsdp2_dtensor":
            from fastdpo import linear_sequence_logprobs

            weight = policy.lm_head.weight  # sharded DTensor outside the root forward
            logps = linear_sequence_logprobs(policy.body(batch["ids"]), weight, batch["labels"])
        else:
            logps = wrapped(batch["ids"], batch["labels"])
        loss = head_dpo_loss(logps, ref, batch)
    else:
        policy, ref, tok = build_engine_parts(seed)
        per = len(ENGINE_ROWS) // world
        wrapped = _wrap(mode, policy, scenario)
        from fastdpo import DPOEngine

        engine = DPOEngine(wrapped, ref, loss_type="sigmoid", beta=BETA)
        loss, _ = engine.step(engine_batch(tok, ENGINE_ROWS[rank * per : (rank + 1) * per]))
    loss.backward()
    grads = _collect(wrapped, "grad")
    torch.optim.SGD(wrapped.parameters(), lr=LR).step()
    return {"loss": float(loss.detach()), "grads": grads, "params": _collect(wrapped, "param")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--init-file", required=True, help="shared file for init_method=file://")
    parser.add_argument("--out", required=True, help="directory for rank{R}.pt")
    parser.add_argument(
        "--jobs",
        nargs="+",
        default=["head:ddp,fsdp2,fsdp2_dtensor", "engine:ddp,fsdp2"],
        help="SCENARIO:MODE[,MODE...] (scenarios: head, engine; modes: ddp, fsdp2, fsdp2_dtensor [head only])",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    import torch.distributed as dist
    from launch import init_file_group, outcome, saving_results

    init_file_group(args.init_file, args.rank, args.world_size)
    results: dict[str, dict[str, Any]] = {}
    with saving_results(results, args.out, args.rank):
        for job in args.jobs:
            scenario, modes = job.split(":")
            results[scenario] = {}
            for mode in modes.split(","):
                results[scenario][mode] = outcome(
                    lambda: run_mode(scenario, mode, args.rank, args.world_size, args.seed)
                )
                dist.barrier()
            results[scenario]["local_grads"] = outcome(
                lambda: _local_grads(scenario, args.rank, args.world_size, args.seed)
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
