"""Held-out (WikiText-2) layer error of GPTQ vs RTN on one SmolLM2 layer, calibrated on 32 or 128 C4 windows.

    OMP_NUM_THREADS=1 python benchmarks/calibration_size.py
"""
import torch, time
from lmcompose.models.load import load_model
from lmcompose.data import calibration_windows, eval_tokens
from lmcompose.pipeline.stats import StatsAccumulator
from lmcompose.algebra.quant import QuantSpec, quantize_rtn
from lmcompose.techniques.quant.gptq import gptq_quantize
torch.set_num_threads(1)
import os
D = os.environ.get("LMCOMPOSE_DATA_DIR", "../shared/data")
model, tok = load_model("smollm2-135m")
layer = model.model.layers[5].mlp.down_proj
def acts(windows):
    xs=[]
    h=layer.register_forward_pre_hook(lambda m,a: xs.append(a[0].reshape(-1,a[0].shape[-1]).detach()))
    with torch.no_grad():
        for w in windows: model(w[None])
    h.remove(); return torch.cat(xs)
cal128 = calibration_windows(tok,"c4",n=128,seqlen=512,seed=0,data_dir=D)
held = eval_tokens(tok,"wikitext2","test",D)[0,:16*512].reshape(16,512)
Xh = acts(held); Xc = acts(cal128)
def gram(X):
    a=StatsAccumulator(X.shape[1]); a.update(X); return a.result().gram
Gh = gram(Xh).double()
W = layer.weight.detach().float()
def err(Wq): d=(W-Wq).double(); return float(((d@Gh)*d).sum()/((W.double()@Gh)*W.double()).sum())
for bits in (3,4):
    spec=QuantSpec(bits,64)
    print("bits",bits,"RTN held-out", err(quantize_rtn(W,spec).dequantize()))
    for n in (32,128):
        G = gram(Xc[:n*512])
        q,_ = gptq_quantize(W,G,spec)
        print(f"  GPTQ n={n} held-out", err(q.dequantize()), "calib", float((((W-q.dequantize()).double()@gram(Xc[:n*512]).double())*(W-q.dequantize()).double()).sum()/(((W.double()@gram(Xc[:n*512]).double())*W.double()).sum())))
