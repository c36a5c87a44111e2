"""Packed-row attention: per-sequence log-probs from every packing equal each sequence run alone (tiny HF models)."""

from __future__ import annotations

import types

import pytest
import torch

from fastdpo import PreferenceCollator
from fastdpo.attention import allowed_mask, build_attention_kwargs, resolve_impl
from fastdpo.reference import naive_batch_logps, naive_completion_logps
from fastdpo.tiny import make_model, make_tokenizer, preference_rows

RTOL = 1e-5
N_PAIRS = 4


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def rows(tok):
    rows = preference_rows(N_PAIRS, seed=21)
    # an empty rejected completion (legal: log-prob 0) and a completion that is a single token
    prompt = tok("Hello there")["input_ids"]
    rows.append({"prompt_input_ids": prompt, "chosen_input_ids": tok(" Hi")["input_ids"][1:], "rejected_input_ids": []})
    return rows


def _pieces(tok, rows):
    """Token ids of every sequence, TRL order: (prompt, completion) for chosen 0..P-1 then rejected 0..P-1."""
    col = PreferenceCollator(tok)
    split = [col.tokenize_row(r) for r in rows]
    return [(p, c) for p, c, _ in split] + [(p, r) for p, _, r in split]


def naive_logps(model, pieces) -> torch.Tensor:
    """Oracle: each sequence alone, unpadded, no mask; float64 log_softmax; sum over its completion tokens."""
    return torch.tensor([naive_completion_logps(model, p, c) for p, c in pieces], dtype=torch.float64)


def packed_logps(model, batch, impl="auto", kwargs=None) -> torch.Tensor:
    """Full logits of the packed forward, gathered at logp_index/logp_labels, summed by logp_seq (float64)."""
    kwargs = build_attention_kwargs(batch, model, impl=impl) if kwargs is None else kwargs
    with torch.no_grad():
        return naive_batch_logps(model, batch, attn_kwargs=kwargs, logits_dtype=torch.float64)


def assert_close_rel(got: torch.Tensor, ref: torch.Tensor) -> None:
    err = (got - ref).abs()
    assert (ref.abs() > 0.5).sum() >= ref.numel() - 1, "oracle must be non-trivial"
    assert bool((err <= RTOL * ref.abs()).all()), f"max rel err {(err / ref.abs().clamp(min=1e-30)).max():.3e}"


CASES = [
    ("llama", "sdpa", None),
    ("llama", "eager", None),
    ("qwen2", "sdpa", None),
    ("qwen2", "eager", 5),  # sliding layers on (layer 1), window shorter than the sequences
    ("qwen2", "sdpa", 5),
    ("gemma2", "eager", None),  # softcapping, sliding window 4096 > all sequences
    ("gemma2", "eager", 5),  # window shorter than the sequences: must be measured in positions
]


@pytest.mark.parametrize("arch,attn,window", CASES)
def test_packed_logps_equal_naive(tok, rows, arch, attn, window):
    model = make_model(arch, tok, attn_implementation=attn, sliding_window=window, seed=3)
    ref = naive_logps(model, _pieces(tok, rows))
    assert ref[-1] == 0  # the empty rejected completion
    for packing in ("pad", "padding_free", "prefix_shared"):
        batch = PreferenceCollator(tok, packing=packing, pad_to_multiple_of=16)(rows)
        got = packed_logps(model, batch)
        assert got[-1] == 0
        assert_close_rel(got[:-1], ref[:-1])


@pytest.mark.parametrize("packing", ["padding_free", "prefix_shared"])
def test_several_rows_with_padding_and_eager_mask_on_sdpa(tok, rows, packing):
    """Rows padded at the end (pad queries see only themselves) and the additive float mask fed to an sdpa model."""
    model = make_model("llama", tok, attn_implementation="sdpa", seed=4)
    ref = naive_logps(model, _pieces(tok, rows))
    batch = PreferenceCollator(tok, packing=packing, max_tokens_per_row=48, pad_to_multiple_of=32)(rows)
    assert batch["input_ids"].shape[0] > 1 and bool((batch["attention_mask"] == 0).any())
    for impl in ("sdpa", "eager"):
        kwargs = build_attention_kwargs(batch, model, impl=impl)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], **kwargs).logits
        assert bool(torch.isfinite(logits).all())
        assert_close_rel(packed_logps(model, batch, kwargs=kwargs)[:-1], ref[:-1])


def test_masks_can_fail(tok, rows):
    """Negative controls: the wrong mask changes the answer, so the equality tests above are meaningful."""
    model = make_model("gemma2", tok, attn_implementation="eager", sliding_window=5, seed=3)
    ref = naive_logps(model, _pieces(tok, rows))
    batch = PreferenceCollator(tok, packing="prefix_shared")(rows)
    kwargs = build_attention_kwargs(batch, model)
    assert set(kwargs["attention_mask"]) == {"full_attention", "sliding_attention"}
    # 1) rejected tokens allowed to see chosen tokens
    leaky = dict(batch, packing="padding_free", token_seq=batch["token_pair"])
    got = packed_logps(model, batch, kwargs=build_attention_kwargs(leaky, model))
    assert not torch.allclose(got[N_PAIRS:-1], ref[N_PAIRS:-1], rtol=1e-3)
    # 2) the sliding window dropped (full mask for every layer)
    no_window = dict(kwargs, attention_mask=kwargs["attention_mask"]["full_attention"])
    got = packed_logps(model, batch, kwargs=no_window)
    assert not torch.allclose(got[:-1], ref[:-1], rtol=1e-3)


def test_packed_backward_is_finite_and_matches(tok, rows):
    """Gradients through a padded, packed eager forward equal the sum of per-sequence gradients."""
    model = make_model("qwen2", tok, attn_implementation="eager", sliding_window=5, seed=5)
    pieces = _pieces(tok, rows)
    weights = torch.linspace(0.5, 1.5, len(pieces), dtype=torch.float64)
    model.zero_grad()
    total = 0.0
    for w, (prompt, completion) in zip(weights, pieces):
        ids = torch.tensor([prompt + completion])
        logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
        first = max(len(prompt), 1)
        k = torch.arange(first, ids.shape[1])
        total = total + float(w) * logp[k - 1, ids[0, k]].sum()
    total.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    batch = PreferenceCollator(tok, packing="prefix_shared", max_tokens_per_row=48, pad_to_multiple_of=32)(rows)
    logits = model(input_ids=batch["input_ids"], **build_attention_kwargs(batch, model)).logits
    logp = logits.reshape(-1, logits.shape[-1]).float().log_softmax(-1)[batch["logp_index"], batch["logp_labels"]]
    (logp * weights.float()[batch["logp_seq"]]).sum().backward()
    for n, p in model.named_parameters():
        assert bool(torch.isfinite(p.grad).all()), n
        scale = float(ref[n].abs().max())
        assert scale > 0, n
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-4, atol=1e-5 * scale, msg=n)


def test_allowed_mask_matches_rule(tok):
    """The vectorized mask equals a token-by-token reading of the contract."""
    rows = preference_rows(3, seed=9)
    for packing in ("padding_free", "prefix_shared"):
        batch = PreferenceCollator(tok, packing=packing, max_tokens_per_row=50, pad_to_multiple_of=8)(rows)
        for window in (None, 4):
            got = allowed_mask(batch, sliding_window=window)
            seq, role, pair, pos = (
                batch[k].tolist() for k in ("token_seq", "token_role", "token_pair", "position_ids")
            )
            R, L = batch["input_ids"].shape
            for r in range(R):
                for q in range(L):
                    for k in range(L):
                        if seq[r][q] < 0:
                            want = q == k
                        elif packing == "padding_free":
                            want = k <= q and seq[r][k] == seq[r][q]
                        else:
                            want = k <= q and pair[r][k] == pair[r][q] and not (role[r][q] == 2 and role[r][k] == 1)
                        if want and window is not None and seq[r][q] >= 0:
                            want = pos[r][q] - pos[r][k] < window
                        assert bool(got[r, q, k]) == want, (packing, window, r, q, k)


# ----------------------------------------------------------------------------------------------- flex attention
def _eager_flex(monkeypatch):
    """Run HF's flex_attention path without torch.compile (CPU inductor compile takes minutes and, in torch 2.13,
    fails to build the C++ kernel for sliding-window masks); numerics are the same flex_attention op."""
    import transformers.integrations.flex_attention as hf_flex
    from torch.nn.attention.flex_attention import flex_attention

    def run(query, key, value, training=False, **kwargs):
        return flex_attention(query, key, value, **kwargs)

    monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention", run)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("arch,window", [("llama", None), ("gemma2", 5)])
def test_flex_block_mask_equals_naive(tok, monkeypatch, arch, window):
    pytest.importorskip("torch.nn.attention.flex_attention")
    _eager_flex(monkeypatch)  # the BlockMask semantics are under test here, not inductor's CPU codegen
    rows = preference_rows(3, seed=13)
    model = make_model(arch, tok, attn_implementation="flex_attention", sliding_window=window, seed=6)
    ref = naive_logps(
        make_model(arch, tok, attn_implementation="eager", sliding_window=window, seed=6), _pieces(tok, rows)
    )
    for packing in ("padding_free", "prefix_shared"):
        batch = PreferenceCollator(tok, packing=packing)(rows)
        kwargs = build_attention_kwargs(batch, model)
        from torch.nn.attention.flex_attention import BlockMask

        masks = kwargs["attention_mask"]
        assert all(isinstance(m, BlockMask) for m in (masks.values() if isinstance(masks, dict) else [masks]))
        assert_close_rel(packed_logps(model, batch, kwargs=kwargs), ref)


# ----------------------------------------------------------------------------------------------- flash varlen
class _FlashStub(torch.nn.Module):
    """Stand-in carrying only what build_attention_kwargs reads (config + a parameter for the device)."""

    def __init__(self, attn: str):
        super().__init__()
        self.config = types.SimpleNamespace(_attn_implementation=attn, layer_types=None, sliding_window=None)
        self.w = torch.nn.Parameter(torch.zeros(1))


def test_flash_varlen_kwargs_match_hf_position_id_split(tok):
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    rows = preference_rows(4, seed=2)
    batch = PreferenceCollator(tok, packing="padding_free")(rows)
    kwargs = build_attention_kwargs(batch, _FlashStub("flash_attention_2"))
    assert "attention_mask" not in kwargs
    (cu_q, cu_k), (max_q, _) = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    assert torch.equal(kwargs["cu_seq_lens_q"], cu_q) and torch.equal(kwargs["cu_seq_lens_k"], cu_k)
    assert kwargs["max_length_q"] == int(max_q) == kwargs["max_length_k"]
    lengths = (batch["token_seq"][0, :, None] == torch.arange(8)).sum(0)
    assert torch.equal(kwargs["cu_seq_lens_q"][1:].diff().long(), lengths[1:])
    # with padding and several rows: one segment per sequence plus one per padding tail
    batch = PreferenceCollator(tok, packing="padding_free", max_tokens_per_row=40, pad_to_multiple_of=64)(rows)
    kwargs = build_attention_kwargs(batch, _FlashStub("flash_attention_2"))
    R, L = batch["input_ids"].shape
    assert int(kwargs["cu_seq_lens_q"][-1]) == R * L
    assert kwargs["cu_seq_lens_q"].numel() == 8 + R + 1
    assert kwargs["cu_seq_lens_q"].dtype == torch.int32


@pytest.mark.gpu
def test_flash_varlen_equals_naive_cuda(tok):
    """Flash varlen on a batch that lives on the GPU (as the engine and the trainers pass it; a CPU batch hid the
    CPU-built cu_seqlens of issue 19.1) gives the sdpa packed forward's logits."""
    pytest.importorskip("flash_attn")
    rows = preference_rows(4, seed=2)
    model = make_model("llama", tok, attn_implementation="flash_attention_2", seed=7).to("cuda", torch.bfloat16)
    ref_model = make_model("llama", tok, attn_implementation="sdpa", seed=7).to("cuda", torch.bfloat16)
    batch = {
        k: v.cuda() if isinstance(v, torch.Tensor) else v
        for k, v in PreferenceCollator(tok, packing="padding_free")(rows).items()
    }
    kwargs = build_attention_kwargs(batch, model)
    assert all(v.is_cuda for v in kwargs.values() if isinstance(v, torch.Tensor))
    with torch.no_grad():
        got = model(input_ids=batch["input_ids"], **kwargs).logits.float()
        sdpa_kwargs = build_attention_kwargs(batch, ref_model)
        want = ref_model(input_ids=batch["input_ids"], **sdpa_kwargs).logits.float()
    torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2)


# ----------------------------------------------------------------------------------------------- dispatch
def test_pad_returns_plain_2d_mask(tok, rows):
    batch = PreferenceCollator(tok, packing="pad")(rows)
    for attn in ("sdpa", "eager", "flash_attention_2", "flex_attention"):
        kwargs = build_attention_kwargs(batch, _FlashStub(attn))
        assert torch.equal(kwargs["attention_mask"], batch["attention_mask"])


def test_formats_and_errors(tok, rows):
    batch = PreferenceCollator(tok, packing="prefix_shared")(rows)
    llama = make_model("llama", tok, attn_implementation="eager")
    mask = build_attention_kwargs(batch, llama)["attention_mask"]
    assert mask.dtype == torch.float32 and mask.shape[:2] == (1, 1)
    assert set(mask.unique().tolist()) == {0.0, torch.finfo(torch.float32).min}
    llama.config._attn_implementation = "sdpa"
    assert build_attention_kwargs(batch, llama)["attention_mask"].dtype == torch.bool
    with pytest.raises(ValueError, match="flash-attention varlen cannot express"):
        build_attention_kwargs(batch, _FlashStub("flash_attention_2"))
    with pytest.raises(ValueError, match="flash-attention varlen cannot express"):
        build_attention_kwargs(batch, llama, impl="flash_varlen")
    with pytest.raises(ValueError, match="ignores such masks"):
        build_attention_kwargs(dict(batch, packing="padding_free"), _FlashStub("flash_attention_2"), impl="sdpa")
    with pytest.raises(ValueError, match="added"):
        build_attention_kwargs(batch, _FlashStub("eager"), impl="sdpa")
    with pytest.raises(ValueError, match="impl must be one of"):
        build_attention_kwargs(batch, llama, impl="xformers")
    with pytest.raises(ValueError, match="attn_implementation='paged"):
        resolve_impl("padding_free", "paged|sdpa")
    with pytest.raises(ValueError, match="lacks"):
        build_attention_kwargs({"packing": "pad"}, llama)
    with pytest.raises(TypeError, match="config"):
        build_attention_kwargs(batch, torch.nn.Linear(2, 2))
