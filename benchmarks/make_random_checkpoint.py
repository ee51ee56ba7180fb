"""Write a random-weight Llama checkpoint of given shapes (default: Llama-2-7B's) for the streaming and resume
benchmarks (issue 21): sharded safetensors (one shard per block, one for the rest) with the
``model.safetensors.index.json`` transformers writes, ``config.json`` and a tokenizer.

It is written block by block: only one block's tensors (in fp32 while drawn) are in memory at a time, so
generating the 13.5 GB 7B-shaped checkpoint stays within about 1 GB of RAM. Weights are N(0, 0.02²) (the
Llama initialiser's std), norms are ones, drawn from one seeded generator: the same arguments give the same
bytes. The tokenizer is copied from ``--tokenizer DIR`` (it must have at most ``--vocab`` ids), else a
byte-level BPE is trained on the calibration text in ``$LMCOMPOSE_DATA_DIR/c4`` (a few seconds) so that
every token id fits the embedding.

    python benchmarks/make_random_checkpoint.py --out /tmp/llama2-7b-random            # 32 blocks, ~13.5 GB
    python benchmarks/make_random_checkpoint.py --blocks 4 --out /tmp/llama2-7b-4blocks
    python benchmarks/make_random_checkpoint.py --blocks 2 --hidden 64 --intermediate 128 --heads 4 \\
        --vocab 512 --out /tmp/tiny                                                  # for tests
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def config_for(args):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_hidden_layers=args.blocks, num_attention_heads=args.heads,
                       num_key_value_heads=args.kv_heads or args.heads, max_position_embeddings=args.max_positions,
                       rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                       dtype=args.dtype.replace("fp", "float").replace("bf16", "bfloat16"))


def shapes(config) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape, from the architecture built on the meta device (no memory)."""
    from accelerate import init_empty_weights
    from transformers import LlamaForCausalLM

    with init_empty_weights():
        model = LlamaForCausalLM(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def draw(shape, gen: torch.Generator, dtype: torch.dtype, std: float = 0.02) -> torch.Tensor:
    if len(shape) == 1:  # RMSNorm weights
        return torch.ones(shape, dtype=dtype)
    out = torch.empty(shape, dtype=dtype)
    rows = max(1, (1 << 24) // shape[1])  # fp32 temporaries of at most 64 MiB
    for start in range(0, shape[0], rows):
        out[start:start + rows] = (torch.randn((min(rows, shape[0] - start), shape[1]), generator=gen) * std).to(dtype)
    return out


def write_tokenizer(out: Path, vocab: int, source: str | None, data_dir: str | None) -> None:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if source:
        tok = AutoTokenizer.from_pretrained(source)
        if len(tok) > vocab:
            raise SystemExit(f"--tokenizer {source!r} has {len(tok)} ids, more than --vocab {vocab}: its ids would "
                             "not fit the embedding; give a larger --vocab or another tokenizer")
        tok.save_pretrained(out)
        return
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from lmcompose.data.text import load_documents

    # the C4 sample lmcompose resolves as for calibration: --data-dir, $LMCOMPOSE_DATA_DIR, the packaged copy
    texts = load_documents("c4", "validation", data_dir)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(vocab, 32000), special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory to write (must not exist)")
    p.add_argument("--blocks", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads (Llama-2-7B has no GQA)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--max-positions", type=int, default=4096)
    p.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None, help="copy this tokenizer (local directory) instead of training one")
    p.add_argument("--data-dir", default=None, help="where the C4 sample is (default: $LMCOMPOSE_DATA_DIR, else the copy shipped with lmcompose)")
    args = p.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"--out {str(out)!r} exists; remove it or choose another directory")
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    config = config_for(args)
    table = shapes(config)
    dtype, gen = DTYPES[args.dtype], torch.Generator().manual_seed(args.seed)
    total = args.blocks + 1
    groups = [[n for n in table if n.startswith(f"model.layers.{i}.")] for i in range(args.blocks)]
    groups.append([n for n in table if not n.startswith("model.layers.")])
    weight_map, size = {}, 0
    for k, names in enumerate(groups, start=1):
        shard = f"model-{k:05d}-of-{total:05d}.safetensors"
        tensors = {n: draw(table[n], gen, dtype) for n in names}
        save_file(tensors, str(tmp / shard), metadata={"format": "pt"})
        size += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(names, shard))
        del tensors
        print(f"shard {k}/{total} written ({size / 2**30:.2f} GiB so far, {time.perf_counter() - t0:.0f} s)",
              flush=True)
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    config.save_pretrained(tmp)
    write_tokenizer(tmp, args.vocab, args.tokenizer, args.data_dir)
    os.replace(tmp, out)
    print(f"wrote {out}: {args.blocks} blocks, {size / 2**30:.2f} GiB of {args.dtype} tensors in "
          f"{time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
