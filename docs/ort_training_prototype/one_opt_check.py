"""Negative check: ONE Optimizer built after all three Modules (instead of one per gradient-buffer set)."""
import os, sys, types
sys.modules.setdefault("onnxruntime.training.optim", types.ModuleType("onnxruntime.training.optim"))
import numpy as np, json
from onnxruntime.training.api import CheckpointState, Module, Optimizer
vd = "out/k0m0/sgd"; meta = json.load(open("out/k0m0/meta.json"))
ref = np.load("out/k0m0/ref_sgd_b3.npz")
st = CheckpointState.load_checkpoint(vd + "/checkpoint")
mods = {g: Module(f"{vd}/{g}_training_model.onnx", st, f"{vd}/{g}_eval_model.onnx") for g in ["local", "front", "tail"]}
opt = Optimizer(f"{vd}/tail_optimizer_model.onnx", mods["tail"]); opt.set_learning_rate(0.01)
p0 = {n: st.parameters[n].data.copy() for n in meta["trainables"]}
mods["local"](ref["s0.images"], ref["s0.labels"].astype(np.int64)); opt.step()
p1 = {n: st.parameters[n].data for n in meta["trainables"]}
print("local step through a single late-built Optimizer: max |param change| =", max(np.abs(p1[n]-p0[n]).max() for n in p0),
      " torch change =", max(np.abs(ref["s0.param."+n]-p0[n]).max() for n in p0))
