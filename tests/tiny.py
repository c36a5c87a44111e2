"""Offline test fixtures: a tokenizer trained in-process and tiny Llama-, Qwen2- and Gemma2-style causal LMs.

Nothing here touches the network. Every builder is deterministic (seeded) and fast (well under a second), so tests
can call them freely; the tokenizer is cached because training it is the slowest step (~10 ms).

Usage from any test file (``tests/`` is put on ``sys.path`` by ``tests/conftest.py``)::

    from tiny import make_tokenizer, make_model
    tok = make_tokenizer()                       # BPE, BOS prepended, EOS "</s>", pad "<pad>", chat template
    model = make_model("llama", tok, attn_implementation="sdpa")   # fp32, 2 layers, hidden 64
"""
from __future__ import annotations

import functools
import importlib.util
import os

import pytest
import torch

#: Backends of the kernel entry points for parametrized tests. The Triton cases run the kernels on CPU tensors through
#: the interpreter (tests/conftest.py sets TRITON_INTERPRET=1 except under `pytest -m gpu`, where CPU tensors cannot
#: reach a compiled kernel), and are reported as skipped where that is impossible.
BACKENDS = [
    "torch",
    pytest.param(
        "triton",
        marks=pytest.mark.skipif(
            os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None,
            reason="Triton on CPU tensors needs triton and TRITON_INTERPRET=1",
        ),
    ),
]

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


@functools.cache
def _trained_backend(vocab_size: int, add_bos: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(CORPUS), trainer=trainer)
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


def _config(arch: str, vocab_size: int, *, sliding_window: int | None):
    common = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(**common, rms_norm_eps=1e-6)
    if arch == "qwen2":
        from transformers import Qwen2Config

        extra = {}
        if sliding_window is not None:
            extra = {"use_sliding_window": True, "sliding_window": sliding_window, "max_window_layers": 1}
        return Qwen2Config(**common, **extra)
    if arch == "gemma2":
        from transformers import Gemma2Config

        return Gemma2Config(
            **common,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=sliding_window if sliding_window is not None else 4096,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
        )
    raise ValueError(f"arch must be 'llama', 'qwen2' or 'gemma2', got {arch!r}")


ARCHS: tuple[str, ...] = ("llama", "qwen2", "gemma2")


def make_model(
    arch: str,
    tokenizer=None,
    *,
    attn_implementation: str = "sdpa",
    sliding_window: int | None = None,
    seed: int = 0,
    vocab_size: int | None = None,
):
    """A tiny fp32 causal LM (hidden 64, 2 layers, 4 heads / 2 KV heads) in eval mode, weights seeded.

    ``arch`` is "llama", "qwen2" or "gemma2" (softcapping on; layer 0 sliding, layer 1 global). ``sliding_window``
    makes the window small enough to matter (Gemma2: its window; Qwen2: turns sliding layers on for layer >= 1).
    The vocabulary is ``len(tokenizer)`` (or ``vocab_size``). Weights are re-drawn with std 0.1 so logits are far
    from uniform (tests must be able to fail).
    """
    from transformers import AutoModelForCausalLM

    if vocab_size is None:
        if tokenizer is None:
            raise ValueError("make_model needs a tokenizer or a vocab_size")
        vocab_size = len(tokenizer)
    config = _config(arch, vocab_size, sliding_window=sliding_window)
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
