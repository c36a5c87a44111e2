"""Tiny offline fixtures: byte-level BPE tokenizers trained in-process, tiny Llama-, Qwen2- and Gemma2-style causal
LMs built from ``transformers`` configs, and tiny preference rows.

One fixture set for the tests, the benchmarks, ``fastdpo memory --measure``, the examples and ``fastdpo train``'s
tiny model. Nothing here touches the network; every builder is deterministic (seeded) and fast.

* :func:`make_tokenizer` / :func:`make_model` / :func:`preference_rows`: the test fixtures. A tokenizer trained on
  :data:`CORPUS` (BOS ``<s>``, EOS ``</s>``, pad ``<pad>``, chat template) and an fp32 model (hidden 64, 2 layers,
  4 heads / 2 KV heads) whose weights are re-drawn with std 0.1 so logits are far from uniform.
* :func:`train_tokenizer` / :func:`build_tiny_model`: a tokenizer trained on the caller's texts (``<pad>`` id 0,
  ``<eos>``, ``<bos>``, the chat roles) and a tied-embedding model at the framework's default initialization: what
  ``fastdpo train`` builds without ``--model`` and what the examples use.
* :func:`tiny_config`: the ``transformers`` config both model builders use.
* :func:`id_tokenizer`: a word-level tokenizer over ids ``0..V-1`` for pre-tokenized rows of any vocabulary size
  (``fastdpo memory --measure``, the benchmarks).

Usage::

    from fastdpo.tiny import make_model, make_tokenizer, preference_rows
    tok = make_tokenizer()
    model = make_model("llama", tok, attn_implementation="sdpa")
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

CORPUS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "A preference pair has a prompt, a chosen answer and a rejected answer.",
    "Direct preference optimization trains a policy against a frozen reference model.",
    "What color is the sky? The sky is blue on a clear day and grey when it rains.",
    "How many legs does a spider have? A spider has eight legs, an insect has six.",
    "Tell me a joke about computers. Why did the computer sneeze? It had a virus!",
    "Write a haiku about autumn leaves falling slowly onto the quiet river.",
    "The capital of France is Paris; the capital of Italy is Rome.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 1024.",
    "Packing sequences saves compute: no padding tokens, no wasted attention.",
    "Hello! Hi there, how can I help you today? I am fine, thank you.",
    "Sorry, I do not know. Maybe ask again later, or try a search engine.",
)

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>")

#: Jinja chat template: ``<s><|user|>text</s><|assistant|>text</s>``; the generation prompt is ``<|assistant|>``.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def _train_bpe(texts: Sequence[str], vocab_size: int, specials: Sequence[str], *, unk_token: str | None = None) -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``texts``: the 256 byte symbols, then ``specials`` (ids
    ``0..len(specials)-1``), then merges up to ``vocab_size``. Byte-level, so any text round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=unk_token))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return tok


@functools.cache
def _trained_backend(vocab_size: int, add_bos: bool):
    from tokenizers import processors

    tok = _train_bpe(CORPUS, vocab_size, SPECIAL_TOKENS, unk_token="<unk>")
    if add_bos:
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
        )
    return tok.to_str()


def make_tokenizer(*, add_bos: bool = True, vocab_size: int = 384):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on :data:`CORPUS`.

    ``add_bos=True`` makes ``tokenizer(text)`` prepend ``<s>`` (Llama-like); ``False`` adds nothing (Qwen2-like).
    The chat template (:data:`CHAT_TEMPLATE`) always starts with ``<s>`` and ends every turn with ``</s>`` (EOS).
    Byte-level, so any text round-trips (no ``<unk>``). A fresh wrapper is returned each call (safe to mutate).
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(_trained_backend(vocab_size, add_bos))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
    )


#: ``fastdpo train``'s tokenizer specials (:func:`train_tokenizer`), in id order.
TRAIN_SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<eos>", "<bos>", "<|system|>", "<|user|>", "<|assistant|>")

_TRAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def train_tokenizer(texts: Sequence[str], vocab_size: int = 512):
    """Train a byte-level BPE tokenizer in-process on ``texts`` (no download).

    Special tokens: :data:`TRAIN_SPECIAL_TOKENS` (``<pad>`` is id 0); a minimal chat template is set so
    conversational rows work too. The vocabulary always holds the 256 bytes plus the specials. Returns a
    ``transformers.PreTrainedTokenizerFast`` (right padding).
    """
    from transformers import PreTrainedTokenizerFast

    tok = _train_bpe(texts, vocab_size, TRAIN_SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", padding_side="right"
    )
    fast.chat_template = _TRAIN_CHAT_TEMPLATE
    return fast


ARCHS: tuple[str, ...] = ("llama", "qwen2", "gemma2")


def tiny_config(
    arch: str,
    vocab_size: int,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    special_ids: tuple[int | None, int | None, int | None] = (0, 1, 2),
    sliding_window: int | None = None,
    tie_word_embeddings: bool | None = None,
) -> Any:
    """A ``transformers`` config of a tiny causal LM: ``hidden_size`` (a multiple of 16), ``num_layers`` layers,
    4 attention heads / 2 KV heads, MLP width ``2 * hidden_size``, 512 positions.

    ``special_ids`` is ``(pad, bos, eos)``. ``sliding_window``: Gemma2's window (default 4096; layer 0 sliding,
    layer 1 global; softcapping on), or for Qwen2 turns sliding layers on from layer 1 with that window.
    ``tie_word_embeddings=None`` keeps the family's default.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if hidden_size % 16:
        raise ValueError(f"hidden_size must be a multiple of 16 (4 heads of even size), got {hidden_size}")
    pad, bos, eos = special_ids
    common = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "pad_token_id": pad,
        "bos_token_id": bos,
        "eos_token_id": eos,
    }
    if tie_word_embeddings is not None:  # else the family's default (Gemma2 ties, Llama and Qwen2 do not)
        common["tie_word_embeddings"] = tie_word_embeddings
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(**common, rms_norm_eps=1e-6)
    if arch == "qwen2":
        from transformers import Qwen2Config

        extra = {}
        if sliding_window is not None:
            extra = {"use_sliding_window": True, "sliding_window": sliding_window, "max_window_layers": 1}
        return Qwen2Config(**common, **extra)
    from transformers import Gemma2Config

    return Gemma2Config(
        **common,
        head_dim=hidden_size // 4,
        query_pre_attn_scalar=hidden_size // 4,
        sliding_window=sliding_window if sliding_window is not None else 4096,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
    )


def make_model(
    arch: str,
    tokenizer=None,
    *,
    attn_implementation: str = "sdpa",
    sliding_window: int | None = None,
    seed: int = 0,
    vocab_size: int | None = None,
    **config_overrides: Any,
):
    """A tiny fp32 causal LM (hidden 64, 2 layers, 4 heads / 2 KV heads) in eval mode, weights seeded.

    ``arch`` is "llama", "qwen2" or "gemma2" (softcapping on; layer 0 sliding, layer 1 global). ``sliding_window``
    makes the window small enough to matter (Gemma2: its window; Qwen2: turns sliding layers on for layer >= 1).
    The vocabulary is ``len(tokenizer)`` (or ``vocab_size``). Weights are re-drawn with std 0.1 so logits are far
    from uniform (tests must be able to fail). ``config_overrides`` set config attributes before the model is built
    (e.g. ``num_key_value_heads=4``).
    """
    from transformers import AutoModelForCausalLM

    if vocab_size is None:
        if tokenizer is None:
            raise ValueError("make_model needs a tokenizer or a vocab_size")
        vocab_size = len(tokenizer)
    config = tiny_config(arch, vocab_size, sliding_window=sliding_window)
    for key, value in config_overrides.items():
        if not hasattr(config, key):
            raise ValueError(f"make_model: {type(config).__name__} has no attribute {key!r}")
        setattr(config, key, value)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in sorted(model.named_parameters()):
                if p.ndim >= 2:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
                elif "norm" not in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.eval()


def build_tiny_model(tokenizer, arch: str = "llama", *, hidden_size: int = 64, num_layers: int = 2, seed: int = 0):
    """A small causal LM (``arch`` in :data:`ARCHS`) sized to ``tokenizer``, tied embeddings, fp32, eager attention,
    at the framework's default initialization under ``seed`` (the same seed gives the same weights; Gemma2's
    sliding window is 64)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(
        arch,
        len(tokenizer),
        hidden_size=hidden_size,
        num_layers=num_layers,
        special_ids=(tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id),
        sliding_window=64 if arch == "gemma2" else None,
        tie_word_embeddings=True,
    )
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def id_tokenizer(vocab_size: int) -> Any:
    """A ``PreTrainedTokenizerFast`` of ``vocab_size`` word-level tokens (``<pad>`` = 0 is also the unknown token,
    ``</s>`` = 1 is EOS, then ``t2``, ``t3``, ...): what :class:`fastdpo.PreferenceCollator` needs to collate
    pre-tokenized rows of any ids below ``vocab_size`` (its length, pad and EOS ids)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 2:
        raise ValueError(f"vocab_size must be at least 2 (pad and EOS), got {vocab_size}")
    vocab = {"<pad>": 0, "</s>": 1}
    vocab.update((f"t{i}", i) for i in range(2, vocab_size))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>")


def preference_rows(n: int = 3, *, conversational: bool = False, seed: int = 0) -> list[dict]:
    """``n`` preference rows of varied lengths drawn (seeded) from :data:`CORPUS`; chat messages if requested."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        i, j, k = (int(x) for x in torch.randint(len(CORPUS), (3,), generator=gen))
        cut = int(torch.randint(8, 40, (1,), generator=gen))
        prompt = CORPUS[i][:cut]
        chosen = " " + CORPUS[j][: int(torch.randint(3, 60, (1,), generator=gen))]
        rejected = " " + CORPUS[k][: int(torch.randint(1, 30, (1,), generator=gen))]
        if conversational:
            rows.append(
                {
                    "prompt": [{"role": "user", "content": prompt}],
                    "chosen": [{"role": "assistant", "content": chosen.strip()}],
                    "rejected": [{"role": "assistant", "content": rejected.strip()}],
                }
            )
        else:
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows
