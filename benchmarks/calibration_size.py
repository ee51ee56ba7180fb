"""Does GPTQ overfit a small calibration set? Held-out layer error of GPTQ vs RTN on one SmolLM2 layer.

The layer's inputs are captured on C4 calibration windows (32 or 128 of 512 tokens) and on held-out
WikiText-2 test text (16 windows); the error ‖(W − Ŵ)X‖² / ‖WX‖² is measured on the held-out inputs.

    OMP_NUM_THREADS=1 LMCOMPOSE_DATA_DIR=../shared/data python benchmarks/calibration_size.py
"""

from __future__ import annotations

import os

import torch

from lmcompose.algebra.quant import QuantSpec, quantize_rtn
from lmcompose.core.stats import StatsAccumulator
from lmcompose.data import calibration_windows, eval_tokens
from lmcompose.models.load import load_model
from lmcompose.techniques.quant.gptq import gptq_quantize

DATA = os.environ.get("LMCOMPOSE_DATA_DIR", "../shared/data")
LAYER = "model.layers.5.mlp.down_proj"


@torch.no_grad()
def inputs_of(model, layer, windows) -> torch.Tensor:
    seen = []
    hook = layer.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    try:
        for w in windows:
            model(w[None])
    finally:
        hook.remove()
    return torch.cat(seen)


def gram(x: torch.Tensor) -> torch.Tensor:
    acc = StatsAccumulator(x.shape[1])
    acc.update(x)
    return acc.result().gram.double()


def rel_error(w, w_hat, g) -> float:
    d = (w - w_hat).double()
    return float(((d @ g) * d).sum() / ((w.double() @ g) * w.double()).sum())


def main() -> None:
    model, tok = load_model("smollm2-135m")
    layer = model.get_submodule(LAYER)
    calib = inputs_of(model, layer, calibration_windows(tok, "c4", n=128, seqlen=512, seed=0, data_dir=DATA))
    held = inputs_of(model, layer, eval_tokens(tok, "wikitext2", "test", DATA)[0, : 16 * 512].reshape(16, 512))
    g_held, w = gram(held), layer.weight.detach().float()
    for bits in (3, 4):
        spec = QuantSpec(bits, 64)
        print(f"{bits} bits g64, RTN: held-out {rel_error(w, quantize_rtn(w, spec).dequantize(), g_held):.5f}")
        for n in (32, 128):
            g_cal = gram(calib[: n * 512])
            q, _ = gptq_quantize(w, g_cal.float(), spec)
            print(f"  GPTQ on {n} windows: held-out {rel_error(w, q.dequantize(), g_held):.5f}, "
                  f"calibration {rel_error(w, q.dequantize(), g_cal):.5f}")


if __name__ == "__main__":
    main()
