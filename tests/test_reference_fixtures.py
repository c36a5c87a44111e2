"""The shared oracles (:mod:`fastdpo.reference`), fixtures (:mod:`fastdpo.tiny`), scalar checks
(:mod:`fastdpo._validation`) and the measuring workers' entry (:mod:`fastdpo.benchmarks.memory_measure`): the pieces
every other suite leans on, checked against independent computations here."""

from __future__ import annotations

import math

import pytest
import torch

from fastdpo import PreferenceCollator, preference_loss
from fastdpo._validation import check_int, check_number
from fastdpo.reference import (
    assert_within_naive,
    naive_batch_logps,
    naive_completion_logps,
    naive_dpo_loss,
    naive_sequence_logprobs,
    naive_token_logprobs,
    tolerance,
)
from fastdpo.tiny import (
    TRAIN_SPECIAL_TOKENS,
    id_tokenizer,
    make_model,
    make_tokenizer,
    preference_rows,
    tiny_config,
    train_tokenizer,
)


# --------------------------------------------------------------------------------------------------- reference
def test_naive_token_logprobs_is_log_softmax_gather_with_ignored_zero() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g, dtype=torch.float64) * 4
    labels = torch.randint(0, 11, (3, 5), generator=g)
    labels[1, 2] = -100
    got = naive_token_logprobs(logits, labels)
    for b in range(3):
        for t in range(5):
            y = int(labels[b, t])
            want = 0.0 if y == -100 else float(logits[b, t, y] - torch.logsumexp(logits[b, t], 0))
            assert float(got[b, t]) == pytest.approx(want, abs=1e-12)


def test_naive_sequence_logprobs_masked_vocab_entry_at_index_0_is_not_nan() -> None:
    """A -inf logit at index 0 (a masked vocabulary entry) on an ignored position must not poison the sum."""
    logits = torch.randn(2, 4, 7, generator=torch.Generator().manual_seed(1))
    logits[..., 0] = float("-inf")
    labels = torch.tensor([[1, 2, -100, 3], [-100, -100, 4, 5]])
    out = naive_sequence_logprobs(logits, labels, average=True)
    assert torch.isfinite(out).all()
    tok = torch.log_softmax(logits.double(), -1)
    want0 = (tok[0, 0, 1] + tok[0, 1, 2] + tok[0, 3, 3]) / 3
    assert float(out[0]) == pytest.approx(float(want0), rel=1e-6)


def test_naive_sequence_logprobs_packed_segments_match_rows() -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 6, 9, generator=g)
    labels = torch.randint(0, 9, (2, 6), generator=g)
    labels[0, :2] = -100
    rows = naive_sequence_logprobs(logits, labels)
    packed = naive_sequence_logprobs(
        logits.reshape(12, 9), labels.reshape(12), segment_ids=torch.arange(2).repeat_interleave(6)
    )
    torch.testing.assert_close(packed, rows)


def test_naive_dpo_loss_is_trl_sigmoid() -> None:
    g = torch.Generator().manual_seed(3)
    pol, ref = -(torch.rand(8, generator=g) * 20 + 1), -(torch.rand(8, generator=g) * 20 + 1)
    want, _ = preference_loss(pol[:4], pol[4:], ref[:4], ref[4:], loss_type="sigmoid", beta=0.3)
    torch.testing.assert_close(naive_dpo_loss(pol, ref, 0.3), want)


def test_naive_batch_logps_same_for_every_packing() -> None:
    """The oracle reads the batch's scored positions, so every packing of the same rows gives the same log-probs as
    each sequence's forward alone (:func:`naive_completion_logps`). Float64 model: the batched and the one-sequence
    forwards differ by up to ~1e-9 relative here (9e-8 on log-probs of ~100); a wrong position or label is O(1)."""
    tok = make_tokenizer()
    model = make_model("llama", tok, attn_implementation="eager").double()
    rows = preference_rows(3, seed=4)
    with torch.no_grad():
        out = {
            p: naive_batch_logps(model, PreferenceCollator(tok, packing=p)(rows))
            for p in ("pad", "padding_free", "prefix_shared")
        }
    split = [PreferenceCollator(tok).tokenize_row(r) for r in rows]
    pieces = [(p, c) for p, c, _ in split] + [(p, r) for p, _, r in split]
    want = [naive_completion_logps(model, p, c) for p, c in pieces]
    assert out["pad"].dtype == torch.float64 and out["pad"].shape == (6,)
    for packing, got in out.items():
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-8, atol=1e-9, msg=packing)


def test_tolerance_by_dtype() -> None:
    assert tolerance(torch.float32) == tolerance(torch.float64) == 2e-6
    assert tolerance(torch.bfloat16) == pytest.approx(2e-6 + 2.0**-8)
    assert tolerance(torch.float16) == pytest.approx(2e-6 + 2.0**-11)
    with pytest.raises(ValueError, match="not a floating dtype"):
        tolerance(torch.int64)


def test_assert_within_naive_passes_and_fails() -> None:
    ref = torch.tensor([1.0, -2.0, 4.0], dtype=torch.float64)
    naive = (ref + torch.tensor([1e-3, 0.0, 0.0], dtype=torch.float64)).float()
    assert_within_naive("ok", (ref + 5e-4).float(), naive, ref)
    with pytest.raises(AssertionError, match="bad: error"):
        assert_within_naive("bad", (ref + 2e-3).float(), naive, ref)
    with pytest.raises(AssertionError):
        assert_within_naive("shape", ref[:2].float(), naive, ref)
    # half precision: one rounding of the result is allowed on top of the naive error
    half = ref.to(torch.bfloat16)
    assert_within_naive("bf16", half + 0.0, half, ref)


# ------------------------------------------------------------------------------------------------------- tiny
def test_make_model_config_overrides() -> None:
    tok = make_tokenizer()
    model = make_model("llama", tok, attn_implementation="eager", num_key_value_heads=4)
    assert model.config.num_key_value_heads == 4
    assert model.model.layers[0].self_attn.k_proj.out_features == 4 * 16
    with pytest.raises(ValueError, match="no attribute 'not_a_field'"):
        make_model("llama", tok, not_a_field=1)
    with pytest.raises(ValueError, match="arch must be one of"):
        tiny_config("gpt2", 100)
    with pytest.raises(ValueError, match="multiple of 16"):
        tiny_config("llama", 100, hidden_size=40)


def test_train_tokenizer_specials_lead_the_vocabulary() -> None:
    """``fastdpo train --vocab-size`` counts on the specials being ids 0..5 and on every byte being present."""
    tok = train_tokenizer(["hello world", "preference pairs"], vocab_size=300)
    assert [tok.convert_tokens_to_ids(t) for t in TRAIN_SPECIAL_TOKENS] == list(range(len(TRAIN_SPECIAL_TOKENS)))
    assert len(tok) >= 256 + len(TRAIN_SPECIAL_TOKENS)
    text = "ünïcödé ✓ 42"
    assert tok.decode(tok(text)["input_ids"]) == text


def test_id_tokenizer() -> None:
    tok = id_tokenizer(50)
    assert len(tok) == 50 and tok.pad_token_id == 0 and tok.eos_token_id == 1
    with pytest.raises(ValueError, match="at least 2"):
        id_tokenizer(1)


# ------------------------------------------------------------------------------------------------ validation
def test_scalar_checks() -> None:
    assert check_int("n", 3, minimum=1) == 3
    with pytest.raises(TypeError, match="n must be an int, got bool"):
        check_int("n", True)
    with pytest.raises(ValueError, match="n must be a positive int, got 0"):
        check_int("n", 0, minimum=1)
    with pytest.raises(ValueError, match="n must be an int >= 2, got 1"):
        check_int("n", 1, minimum=2)
    assert check_number("beta", 2) == 2.0
    with pytest.raises(TypeError, match="beta must be a float, got str"):
        check_number("beta", "0.1")
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="beta must be a finite number"):
            check_number("beta", bad)
    with pytest.raises(ValueError, match="beta must be a finite number > 0, got 0.0"):
        check_number("beta", 0.0, positive=True)


def test_fused_kto_refuses_nonfinite_beta() -> None:
    from fastdpo.fused_kto import FusedLinearKTOLoss

    with pytest.raises(ValueError, match="beta must be a finite number"):
        FusedLinearKTOLoss(beta=float("nan"))
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        FusedLinearKTOLoss(ignore_index=1.5)


# --------------------------------------------------------------------------------------------- memory workers
def test_memory_measure_entry_refuses_bad_arguments() -> None:
    from fastdpo.benchmarks.memory_measure import main

    with pytest.raises(SystemExit, match="usage: python -m fastdpo.benchmarks.memory_measure"):
        main(["_worker", "only-one"])
