"""Build lmcompose's calibration windows once, for the peer tools to read (run in lmcompose's venv).

The peers (llm-compressor, AutoRound; see README.md here) are fed exactly the token ids lmcompose
calibrates on: ``calibration_windows(tokenizer, "c4", n=128, seqlen=512, seed=0)`` with the SmolLM2
tokenizer. The tensor is written with safetensors (key ``input_ids``, int64 ``[n, seqlen]``) outside the
repository (default /tmp/peers_data/), with its model directory and a sha256 of the ids in the metadata.

Example::

    . .venv/bin/activate
    LMCOMPOSE_DATA_DIR=/work/shared/data python benchmarks/peers/make_windows.py
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from lmcompose.data import calibration_windows
from lmcompose.models.load import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--source", default="c4")
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="/tmp/peers_data/c4-n128-s512-seed0.safetensors")
    args = ap.parse_args()

    model, tok = load_model(args.model)
    model_dir = str(tok.name_or_path)
    del model
    ids = calibration_windows(tok, source=args.source, n=args.n, seqlen=args.seqlen, seed=args.seed)
    assert ids.dtype == torch.int64 and tuple(ids.shape) == (args.n, args.seqlen), (ids.dtype, ids.shape)
    digest = hashlib.sha256(ids.contiguous().numpy().tobytes()).hexdigest()
    meta = {"model": args.model, "model_dir": model_dir, "source": args.source, "n": str(args.n),
            "seqlen": str(args.seqlen), "seed": str(args.seed), "sha256": digest}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_file({"input_ids": ids.contiguous()}, args.out, metadata=meta)
    print(json.dumps({"out": args.out, **meta}))


if __name__ == "__main__":
    main()
