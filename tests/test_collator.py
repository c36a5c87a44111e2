"""PreferenceCollator: TRL 1.16 token parity, labels/indices for every packing, truncation, chat, errors."""

from __future__ import annotations

import types
import warnings

import pytest
import torch

from fastdpo import PreferenceCollator
from fastdpo.collator import PACKINGS
from fastdpo.tiny import make_tokenizer, preference_rows

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _views(batch: dict) -> list[list[int]]:
    """Flat locations of every sequence's tokens (prompt then completion), rebuilt from token_seq/role/pair only."""
    P = batch["num_pairs"]
    seq = batch["token_seq"].reshape(-1)
    role = batch["token_role"].reshape(-1)
    pair = batch["token_pair"].reshape(-1)
    views = []
    for s in range(2 * P):
        if batch["packing"] == "prefix_shared":
            i, own = s % P, (1 if s < P else 2)
            sel = (pair == i) & ((role == 0) | (role == own))
        else:
            sel = seq == s
        views.append(sel.nonzero().flatten().tolist())
    return views


def _expected_logp(batch: dict) -> tuple[list[tuple[int, int, int, int]], list[int]]:
    """(index, label, seq, pos) of every scored completion token + per-sequence counts, from the views."""
    flat = batch["input_ids"].reshape(-1)
    role = batch["token_role"].reshape(-1)
    out, counts = [], []
    for s, loc in enumerate(_views(batch)):
        n = 0
        for k in range(1, len(loc)):
            if int(role[loc[k]]) != 0:
                out.append((loc[k - 1], int(flat[loc[k]]), s, n))
                n += 1
        counts.append(n)
    return out, counts


def _check_batch(batch: dict, P: int) -> None:
    """Contract invariants shared by every packing."""
    R, L = batch["input_ids"].shape
    for key in ("input_ids", "position_ids", "attention_mask", "token_seq", "token_role", "token_pair"):
        assert batch[key].shape == (R, L) and batch[key].dtype == torch.long, key
    for key in ("logp_index", "logp_labels", "logp_seq", "logp_pos", "chosen_lengths", "rejected_lengths"):
        assert batch[key].dtype == torch.long, key
    assert batch["num_pairs"] == P
    assert torch.equal(batch["attention_mask"], (batch["token_seq"] >= 0).long())
    assert torch.equal(batch["token_role"] == -1, batch["token_seq"] == -1)
    assert torch.equal(batch["token_pair"] == -1, batch["token_seq"] == -1)
    # positions count 0.. along every view
    pos = batch["position_ids"].reshape(-1)
    for loc in _views(batch):
        assert pos[loc].tolist() == list(range(len(loc)))
    exp, counts = _expected_logp(batch)
    got = list(zip(*(batch[k].tolist() for k in ("logp_index", "logp_labels", "logp_seq", "logp_pos"))))
    assert got == exp
    assert batch["chosen_lengths"].tolist() == counts[:P]
    assert batch["rejected_lengths"].tolist() == counts[P:]


def _sequences(batch: dict) -> list[list[int]]:
    flat = batch["input_ids"].reshape(-1)
    return [flat[loc].tolist() for loc in _views(batch)]


# ----------------------------------------------------------------------------------------------- TRL parity
def _trl_batch(tok, rows, max_length, truncation_mode):
    """TRL 1.16's own preprocessing (DPOTrainer._prepare_dataset, unmodified) + DataCollatorForPreference."""
    import datasets

    datasets.disable_progress_bars()
    fake_trainer = types.SimpleNamespace(_tokenizer=tok)
    args = types.SimpleNamespace(dataset_num_proc=None, max_length=max_length, truncation_mode=truncation_mode)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = trl_dpo.DPOTrainer._prepare_dataset(fake_trainer, datasets.Dataset.from_list(rows), tok, args, "train")
    examples = [{k: e[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for e in ds]
    collate = trl_dpo.DataCollatorForPreference(
        pad_token_id=tok.pad_token_id, max_length=max_length, truncation_mode=truncation_mode
    )
    return examples, collate(examples)


@pytest.mark.parametrize("add_bos", [True, False])
@pytest.mark.parametrize("conversational", [False, True])
@pytest.mark.parametrize("max_length,mode", [(None, "keep_start"), (24, "keep_start"), (24, "keep_end")])
def test_pad_matches_trl_token_ids(add_bos, conversational, max_length, mode):
    tok = make_tokenizer(add_bos=add_bos)
    rows = preference_rows(6, conversational=conversational, seed=11)
    if not conversational:  # one completion that already ends with EOS: TRL does not add a second one
        rows[0]["chosen"] = rows[0]["chosen"] + tok.eos_token
    examples, ref = _trl_batch(tok, rows, max_length, mode)
    if max_length is not None and mode == "keep_start":  # TRL's dataset drops rows whose prompt fills max_length
        rows = [r for r in rows if len(PreferenceCollator(tok).tokenize_row(r)[0]) < max_length]
    assert len(rows) == len(examples) > 0
    batch = PreferenceCollator(tok, max_length=max_length, truncation_mode=mode, packing="pad")(rows)
    _check_batch(batch, len(rows))
    assert torch.equal(batch["input_ids"], ref["input_ids"])
    assert torch.equal(batch["attention_mask"], ref["attention_mask"])
    # TRL scores completion_mask[:, 1:] with the hidden state one to the left
    shifted = ref["completion_mask"][:, 1:].bool()
    R, L = ref["input_ids"].shape
    flat_pred = (torch.arange(R)[:, None] * L + torch.arange(L - 1)[None, :])[shifted]
    assert torch.equal(batch["logp_index"], flat_pred)
    assert torch.equal(batch["logp_labels"], ref["input_ids"][:, 1:][shifted])
    lengths = torch.cat([batch["chosen_lengths"], batch["rejected_lengths"]])
    assert torch.equal(lengths, shifted.sum(1))
    if not conversational and max_length is None:
        eos = tok.eos_token_id
        assert batch["logp_labels"][batch["logp_seq"] == 0][-1] == eos
        assert int((batch["input_ids"][0] == eos).sum()) == 1  # not doubled


# ----------------------------------------------------------------------------------------------- packings
@pytest.mark.parametrize("packing", PACKINGS)
@pytest.mark.parametrize("conversational", [False, True])
def test_packings_same_sequences_and_labels(tok, packing, conversational):
    rows = preference_rows(5, conversational=conversational, seed=5)
    ref = PreferenceCollator(tok, packing="pad")(rows)
    batch = PreferenceCollator(tok, packing=packing, pad_to_multiple_of=8)(rows)
    _check_batch(batch, 5)
    assert batch["input_ids"].shape[1] % 8 == 0
    assert _sequences(batch) == _sequences(ref)
    for key in ("logp_labels", "logp_seq", "logp_pos", "chosen_lengths", "rejected_lengths"):
        assert torch.equal(batch[key], ref[key]), key
    assert batch["packing"] == packing
    if packing == "padding_free":
        assert batch["input_ids"].shape[0] == 1
    if packing == "prefix_shared":
        assert batch["input_ids"].shape[0] == 1
        # the prompt is stored once per pair: fewer tokens than padding_free
        n_tokens = int(batch["attention_mask"].sum())
        prompt_lens = [len(PreferenceCollator(tok).tokenize_row(r)[0]) for r in rows]
        assert n_tokens == int(ref["attention_mask"].sum()) - sum(prompt_lens)
        # first rejected token is predicted by the last prompt token, not the last chosen one
        role = batch["token_role"].reshape(-1)
        for i in range(5):
            first = batch["logp_index"][(batch["logp_seq"] == 5 + i) & (batch["logp_pos"] == 0)]
            assert int(role[first]) == 0


def test_chosen_and_rejected_order_is_trl(tok):
    rows = preference_rows(3, seed=2)
    batch = PreferenceCollator(tok, packing="pad")(rows)
    for i, row in enumerate(rows):
        p, c, r = PreferenceCollator(tok).tokenize_row(row)
        assert _sequences(batch)[i] == p + c
        assert _sequences(batch)[3 + i] == p + r
        assert batch["token_role"][i][len(p) : len(p) + len(c)].eq(1).all()
        assert batch["token_role"][3 + i][len(p) : len(p) + len(r)].eq(2).all()
        assert batch["token_pair"][3 + i][0] == i


@pytest.mark.parametrize("packing", ["padding_free", "prefix_shared"])
def test_max_tokens_per_row(tok, packing):
    rows = preference_rows(6, seed=8)
    cap = 60
    batch = PreferenceCollator(tok, packing=packing, max_tokens_per_row=cap)(rows)
    _check_batch(batch, 6)
    ref = PreferenceCollator(tok, packing="pad")(rows)
    assert _sequences(batch) == _sequences(ref)
    R = batch["input_ids"].shape[0]
    assert R > 1
    used = batch["attention_mask"].sum(1)
    # a row exceeds the cap only when it holds a single item that is longer than the cap by itself
    for r in range(R):
        if used[r] > cap:
            items = batch["token_pair" if packing == "prefix_shared" else "token_seq"][r]
            assert items[items >= 0].unique().numel() == 1


# ----------------------------------------------------------------------------------------------- truncation
P_IDS, C_IDS, R_IDS = list(range(10, 20)), list(range(30, 36)), list(range(40, 43))
ROW = {"prompt_input_ids": P_IDS, "chosen_input_ids": C_IDS, "rejected_input_ids": R_IDS}


def _pad_seqs(tok, **kw) -> list[list[int]]:
    return _sequences(PreferenceCollator(tok, packing="pad", **kw)([ROW]))


def test_truncation_max_length(tok):
    assert _pad_seqs(tok, max_length=12, truncation_mode="keep_end") == [P_IDS[4:] + C_IDS, P_IDS[1:] + R_IDS]
    assert _pad_seqs(tok, max_length=12, truncation_mode="keep_start") == [P_IDS + C_IDS[:2], P_IDS + R_IDS[:2]]
    # completion longer than the budget: keep_end cuts into the completion; its first kept token is not scored
    b = PreferenceCollator(tok, max_length=4, truncation_mode="keep_end")([ROW])
    assert _sequences(b) == [C_IDS[2:], R_IDS[:0] + P_IDS[-1:] + R_IDS]
    assert b["chosen_lengths"].tolist() == [3] and b["rejected_lengths"].tolist() == [3]
    _check_batch(b, 1)


def test_truncation_prompt_and_completion_caps(tok):
    assert _pad_seqs(tok, max_prompt_length=3, truncation_mode="keep_end") == [P_IDS[-3:] + C_IDS, P_IDS[-3:] + R_IDS]
    assert _pad_seqs(tok, max_prompt_length=3, truncation_mode="keep_start") == [P_IDS[:3] + C_IDS, P_IDS[:3] + R_IDS]
    assert _pad_seqs(tok, max_completion_length=2) == [P_IDS + C_IDS[:2], P_IDS + R_IDS[:2]]
    # caps compose: prompt cap, completion cap, then max_length
    assert _pad_seqs(tok, max_prompt_length=6, max_completion_length=4, max_length=8, truncation_mode="keep_end") == [
        P_IDS[-4:] + C_IDS[:4],
        P_IDS[-5:] + R_IDS,
    ]


@pytest.mark.parametrize("packing", PACKINGS)
def test_empty_completions_are_legal(tok, packing):
    rows = [
        {"prompt_input_ids": [5, 6, 7], "chosen_input_ids": [], "rejected_input_ids": [8, 9]},
        {"prompt_input_ids": [], "chosen_input_ids": [11], "rejected_input_ids": [12, 13, 14]},  # no prompt
        {"prompt_input_ids": [15] * 9, "chosen_input_ids": [16, 17], "rejected_input_ids": [18]},  # cut to nothing
    ]
    batch = PreferenceCollator(tok, packing=packing, max_length=9, truncation_mode="keep_start")(rows)
    _check_batch(batch, 3)
    assert batch["chosen_lengths"].tolist() == [0, 0, 0]  # empty; single token at position 0; truncated away
    assert batch["rejected_lengths"].tolist() == [2, 2, 0]
    assert set(batch["logp_seq"].tolist()) == {3, 4}
    # a batch with no scored token at all is still a valid batch
    empty = PreferenceCollator(tok, packing=packing)(
        [{"prompt_input_ids": [], "chosen_input_ids": [], "rejected_input_ids": []}]
    )
    _check_batch(empty, 1)
    assert empty["logp_index"].numel() == 0 and empty["input_ids"].shape[1] >= 1


def test_prefix_shared_keep_end_keeps_one_prompt_per_pair(tok):
    col = PreferenceCollator(tok, packing="prefix_shared", max_length=12, truncation_mode="keep_end")
    with pytest.warns(UserWarning, match="shorter prompt suffix"):
        batch = col([ROW])
    _check_batch(batch, 1)
    assert _sequences(batch) == [P_IDS[4:] + C_IDS, P_IDS[4:] + R_IDS]
    # without truncation conflicts the three packings agree exactly
    col = PreferenceCollator(tok, packing="prefix_shared", max_length=12, truncation_mode="keep_start")
    assert _sequences(col([ROW])) == _pad_seqs(tok, max_length=12, truncation_mode="keep_start")


# ----------------------------------------------------------------------------------------------- inputs
def test_chat_messages_use_the_template(tok):
    row = preference_rows(1, conversational=True, seed=4)[0]
    batch = PreferenceCollator(tok)([row])
    prompt = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True)
    full = tok.apply_chat_template(row["prompt"] + row["chosen"], tokenize=True, return_dict=True)["input_ids"]
    assert _sequences(batch)[0] == list(full)
    n = len(prompt["input_ids"])
    assert full[:n] == list(prompt["input_ids"])
    assert batch["token_role"][0, :n].eq(0).all() and batch["token_role"][0, n : len(full)].eq(1).all()
    assert full[0] == tok.bos_token_id and full[-1] == tok.eos_token_id  # template's BOS/EOS, none added on top
    assert int((batch["input_ids"][0] == tok.eos_token_id).sum()) == 2  # user turn + assistant turn


def test_pretokenized_rows_are_verbatim(tok):
    a = PreferenceCollator(tok)([ROW])
    b = PreferenceCollator(tok)([{"prompt_ids": P_IDS, "chosen_ids": torch.tensor(C_IDS), "rejected_ids": R_IDS}])
    assert _sequences(a) == _sequences(b) == [P_IDS + C_IDS, P_IDS + R_IDS]
    assert a["chosen_lengths"].tolist() == [len(C_IDS)]
    np = pytest.importorskip("numpy")
    c = PreferenceCollator(tok)(
        [
            {
                "prompt_input_ids": np.array(P_IDS),
                "chosen_input_ids": [np.int64(t) for t in C_IDS],
                "rejected_input_ids": R_IDS,
            }
        ]
    )
    assert _sequences(c) == _sequences(a)


def test_ref_logps_pass_through(tok):
    rows = [
        dict(ROW, ref_chosen_logps=-1.5, ref_rejected_logps=-2.25),
        dict(ROW, ref_chosen_logps=-3.0, ref_rejected_logps=-0.5),
    ]
    batch = PreferenceCollator(tok)(rows)
    assert batch["ref_chosen_logps"].dtype == torch.float32
    assert batch["ref_chosen_logps"].tolist() == [-1.5, -3.0]
    assert batch["ref_rejected_logps"].tolist() == [-2.25, -0.5]


def test_bad_inputs(tok):
    col = PreferenceCollator(tok)
    with pytest.raises(ValueError, match="empty"):
        col([])
    with pytest.raises(TypeError, match="rows"):
        col({"prompt": "a", "chosen": "b", "rejected": "c"})
    with pytest.raises(ValueError, match=r"rows\[1\] lacks \['rejected'\]"):
        col([{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b"}])
    with pytest.raises(ValueError, match="pre-tokenized but lacks"):
        col([{"prompt_input_ids": [1], "chosen_input_ids": [2]}])
    with pytest.raises(TypeError, match=r"rows\[0\]\['chosen'\]"):
        col([{"prompt": "a", "chosen": 3, "rejected": "c"}])
    with pytest.raises(TypeError, match="mixes strings and chat messages"):
        col([{"prompt": [{"role": "user", "content": "a"}], "chosen": "b", "rejected": "c"}])
    with pytest.raises(ValueError, match="'role' and 'content'"):
        col(
            [
                {
                    "prompt": [{"role": "user"}],
                    "chosen": [{"role": "assistant", "content": "b"}],
                    "rejected": [{"role": "assistant", "content": "c"}],
                }
            ]
        )
    with pytest.raises(ValueError, match="outside the tokenizer's vocabulary"):
        col([{"prompt_input_ids": [1], "chosen_input_ids": [len(tok)], "rejected_input_ids": [2]}])
    with pytest.raises(TypeError, match="must contain ints"):
        col([{"prompt_input_ids": [1.0], "chosen_input_ids": [2], "rejected_input_ids": [2]}])
    with pytest.raises(TypeError, match="must be a dict"):
        col(["not a row"])
    with pytest.raises(ValueError, match="packing"):
        PreferenceCollator(tok, packing="ragged")
    with pytest.raises(ValueError, match="truncation_mode"):
        PreferenceCollator(tok, truncation_mode="middle")
    with pytest.raises(ValueError, match="max_length"):
        PreferenceCollator(tok, max_length=0)
    with pytest.raises(TypeError, match="max_prompt_length"):
        PreferenceCollator(tok, max_prompt_length=2.5)
    with pytest.raises(ValueError, match="max_tokens_per_row"):
        PreferenceCollator(tok, packing="pad", max_tokens_per_row=64)
    no_template = make_tokenizer()
    no_template.chat_template = None
    with pytest.raises(ValueError, match="chat_template"):
        PreferenceCollator(no_template)(preference_rows(1, conversational=True))
