"""What a model writes: greedy continuation of one prompt, through the tokenizer's chat template where it has
one (``lmcompose generate``).

Perplexity says how much a compressed model lost on average; reading its answer beside the dense model's
says what it lost. Decoding is greedy (deterministic, so two runs and two models are compared on the model
alone), with the KV cache, and stops at an end-of-sequence token or after `max_new_tokens`.

Example::

    out = generate_text(model, tokenizer, "What is the capital of France?", max_new_tokens=32)
    print(out.text, len(out.token_ids), out.seconds)
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass
class Generation:
    """One answer: its text (special tokens removed), its token ids, the seconds they took, and whether the
    prompt went through the chat template."""

    text: str
    token_ids: list[int]
    seconds: float
    chat_template: bool


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_ids(tokenizer, prompt: str, chat_template: bool = True) -> tuple[torch.Tensor, bool]:
    """``([1, n] token ids, whether the chat template was used)`` for `prompt`: as one user turn followed by the
    assistant's generation prompt when `chat_template` and the tokenizer has a template (instruct models answer
    a plain prompt worse: they were tuned on the template), else the plain text."""
    if chat_template and has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids, True
    return tokenizer(prompt, return_tensors="pt").input_ids, False


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for value in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


@torch.inference_mode()
def greedy(model, input_ids: torch.Tensor, max_new_tokens: int, eos_ids=()) -> list[int]:
    """Greedy decoding with the KV cache: the new token ids (the last one an end-of-sequence token, if one came).
    transformers' own `generate` runs the loop (its cache API changes between versions), with a generation config
    of its own so that the model's sampling defaults (temperature, top-p) play no part."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    eos = sorted(eos_ids) or None
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=eos,
                              pad_token_id=eos[0] if eos else 0)
    ids = input_ids.to(device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    new = out[0, ids.shape[1]:].tolist()
    return new[:new.index(next(t for t in new if t in eos_ids)) + 1] if any(t in eos_ids for t in new) else new


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 64, chat_template: bool = True) -> Generation:
    """Greedy answer of `model` to `prompt` (see `prompt_ids` for the chat template)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: allowed: an integer >= 1")
    ids, templated = prompt_ids(tokenizer, prompt, chat_template)
    t0 = time.perf_counter()
    new = greedy(model, ids, max_new_tokens, _eos_ids(model, tokenizer))
    seconds = time.perf_counter() - t0
    return Generation(tokenizer.decode(new, skip_special_tokens=True).strip(), new, seconds, templated)
