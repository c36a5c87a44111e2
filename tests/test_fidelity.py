"""Training fidelity: 200 DPO steps with fastdpo track the naive path step for step.

Two copies of the same seeded tiny Llama (1 layer, hidden 32: the run takes seconds) are trained side by side in fp32
on the same batches with the same optimizer: one through :class:`fastdpo.DPOEngine` (backbone -> completion hidden
states -> fused head -> ``preference_loss``), the other the naive way (:mod:`fastdpo.reference`: full ``[R, L, V]``
logits from the model's own forward, ``log_softmax``, gather, masked per-sequence sums, the sigmoid DPO formula),
both against the same frozen reference model. The reference log-probs are computed once per batch on each side — by
the engine's ``precompute_reference`` into a :class:`~fastdpo.ref_cache.RefLogpCache` (``reference="precomputed"``),
and by the naive path for the naive run. Their loss curves must agree within 1e-3 at every step, and training must
actually move the loss.

The naive path takes token ids, masks and positions from the collated batch but derives which tokens are scored (and
for which sequence) itself from ``token_role`` / ``token_seq``, independently of the collator's ``logp_*`` indices.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from fastdpo.reference import naive_dpo_loss, naive_token_logprobs

STEPS = 200
PAIRS_PER_BATCH = 2
NUM_ROWS = 16
BETA = 0.1
LR = 3e-3
TOL = 1e-3


def naive_sequence_logps(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """``[2P]`` fp32 summed completion log-probs from the model's full logits (chosen 0..P-1, rejected P..2P-1)."""
    num_seqs = 2 * int(batch["num_pairs"])
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
    ).logits.float()  # [R, L, V]
    tok = naive_token_logprobs(logits[:, :-1], batch["input_ids"][:, 1:])
    role, seq = batch["token_role"][:, 1:], batch["token_seq"][:, 1:]
    scored = (role == 1) | (role == 2)  # the next token is a completion token
    out = torch.zeros(num_seqs, dtype=torch.float32)
    return out.index_add(0, seq[scored], tok[scored])


def naive_step_loss(policy: torch.nn.Module, ref_logps: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    return naive_dpo_loss(naive_sequence_logps(policy, batch), ref_logps, BETA)


def _tiny_llama(tok: Any, seed: int) -> torch.nn.Module:
    """1-layer, hidden-32 Llama (fp32, eager attention) with weights drawn at std 0.1 so logits are far from flat."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        rms_norm_eps=1e-6,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
        with torch.no_grad():
            for _name, p in sorted(model.named_parameters()):
                if p.ndim >= 2:
                    p.normal_(0.0, 0.1)
    return model


def _short_rows(tiny: Any, n: int, seed: int) -> list[dict[str, str]]:
    """Short preference rows (a few tokens each) cut from the tiny corpus."""
    gen = torch.Generator().manual_seed(seed)
    corpus = tiny.CORPUS
    rows = []
    for _ in range(n):
        i, j, k = (int(x) for x in torch.randint(len(corpus), (3,), generator=gen))
        a, b, c = (int(x) for x in torch.randint(4, 14, (3,), generator=gen))
        rows.append({"prompt": corpus[i][:a], "chosen": " " + corpus[j][:b], "rejected": " " + corpus[k][:c]})
    return rows


@pytest.mark.usefixtures("one_thread")
def test_200_step_dpo_matches_naive() -> None:
    from fastdpo import DPOEngine, PreferenceCollator, tiny

    tok = tiny.make_tokenizer()
    base = _tiny_llama(tok, seed=0)
    ref = copy.deepcopy(base).eval().requires_grad_(False)
    fast_model = copy.deepcopy(base).train()
    naive_model = copy.deepcopy(base).train()
    rows = _short_rows(tiny, NUM_ROWS, seed=11)
    collate = PreferenceCollator(tok, packing="pad")
    batches = [collate(rows[i : i + PAIRS_PER_BATCH]) for i in range(0, len(rows), PAIRS_PER_BATCH)]

    cache = DPOEngine(fast_model, ref, loss_type="sigmoid", beta=BETA).precompute_reference(batches)
    engine = DPOEngine(
        fast_model,
        reference="precomputed",
        ref_cache=cache,
        loss_type="sigmoid",
        beta=BETA,
        compute_token_metrics=False,
    )
    with torch.no_grad():
        naive_ref = [naive_sequence_logps(ref, b) for b in batches]
    opt_fast = torch.optim.AdamW(fast_model.parameters(), lr=LR, weight_decay=0.0)
    opt_naive = torch.optim.AdamW(naive_model.parameters(), lr=LR, weight_decay=0.0)

    fast_losses, naive_losses = [], []
    for step in range(STEPS):
        k = step % len(batches)
        loss_f, _ = engine.step(batches[k])
        loss_f.backward()
        opt_fast.step()
        opt_fast.zero_grad(set_to_none=True)

        loss_n = naive_step_loss(naive_model, naive_ref[k], batches[k])
        loss_n.backward()
        opt_naive.step()
        opt_naive.zero_grad(set_to_none=True)

        fast_losses.append(float(loss_f.detach()))
        naive_losses.append(float(loss_n.detach()))
        assert abs(fast_losses[-1] - naive_losses[-1]) <= TOL, (
            f"step {step}: fastdpo loss {fast_losses[-1]:.6f} vs naive {naive_losses[-1]:.6f}; "
            f"first steps fast={fast_losses[:5]} naive={naive_losses[:5]}"
        )

    fast = torch.tensor(fast_losses)
    naive = torch.tensor(naive_losses)
    assert (fast - naive).abs().max() <= TOL
    # training really happened (the comparison is not between two flat lines): at step 0 policy == reference, so the
    # loss is log 2; the last epoch's loss is well below it
    assert abs(naive_losses[0] - 0.693147) < 1e-4, naive_losses[0]
    assert float(naive[-len(batches) :].mean()) < 0.4, naive_losses[-len(batches) :]
