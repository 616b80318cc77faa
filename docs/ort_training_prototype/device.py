"""Device-side runner for the ORT on-device-training backend (prototype). numpy + onnxruntime-training only.

Run in <ort-training-venv> (onnxruntime-training-cpu==1.19.2, onnx==1.17.0, numpy; NO torch):
  OMP_NUM_THREADS=1 <ort-training-venv>/bin/python device.py --out out [--configs k0m0 k1m1] [--variants sgdm adamw ...]

One shared CheckpointState (prompts + tail params [+ in-graph optimizer state]) serves three Modules:
  local  (images, labels[, opt_t]) -> loss, logits                    trains prompts + tail
  front  (images, upstream[, opt_t]) -> loss=sum(tokens*upstream), tokens   trains prompts; eval: images -> tokens
  tail   (features, labels[, opt_t]) -> loss, logits, dfeatures       trains tail
and two Optimizer objects over the same state (see make_session for why two).

For every (config, variant, batch) it replays the PyTorch reference protocol saved by build.py (ref_*.npz):
round 1 = 3 local + 3 split steps, FedAvg stand-in (params written by name) + optimizer reset, round 2 = 2 + 2;
the server side of a split step (features, upstream dL/dtokens) comes from the reference. The device runs free
(its own params/state throughout); every output and every trainable after every step is compared to PyTorch.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
import types

os.environ.setdefault("OMP_NUM_THREADS", "1")

# onnxruntime/training/__init__.py imports `optim` (fp16 optimizer wrappers) which imports torch. Stub that one
# subpackage; api/ (CheckpointState, Module, Optimizer) itself needs only numpy + the C extension.
sys.modules.setdefault("onnxruntime.training.optim", types.ModuleType("onnxruntime.training.optim"))

import numpy as np                                                        # noqa: E402
import onnxruntime as ort                                                 # noqa: E402
from onnxruntime.training.api import CheckpointState, Module, Optimizer   # noqa: E402

assert "torch" not in sys.modules

REF_OPT = {"sgdm": "sgdm", "adamw": "adamw", "native_adamw": "adamw", "sgd": "sgd"}
IN_GRAPH = {"sgdm", "adamw"}   # optimizer state lives in the checkpoint as frozen params 'opt.<slot>.<name>'


def session_options():
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return so


class Client:
    """The three Modules + two Optimizers over one CheckpointState."""

    def __init__(self, vd: str, checkpoint: str):
        self.vd = vd
        self.state = CheckpointState.load_checkpoint(checkpoint)
        p = lambda n: os.path.join(vd, n)  # noqa: E731
        # Module() allocates a *new* gradient buffer for each trainable it uses and points the shared
        # Parameter's gradient at it; Optimizer() snapshots Parameter->Gradient() when it is built.
        # So: build `local` then its Optimizer, then `front` + `tail` and a second Optimizer. The two Optimizers
        # share the state's optimizer group (moments, step, lr): the 2nd finds group0 and reuses it (LoadStateDict).
        self.local = Module(p("local_training_model.onnx"), self.state, p("local_eval_model.onnx"),
                            session_options=session_options())
        self.opt_local = Optimizer(p("local_optimizer_model.onnx"), self.local)
        self.front = Module(p("front_training_model.onnx"), self.state, p("front_eval_model.onnx"),
                            session_options=session_options())
        self.tail = Module(p("tail_training_model.onnx"), self.state, p("tail_eval_model.onnx"),
                           session_options=session_options())
        self.opt_split = Optimizer(p("tail_optimizer_model.onnx"), self.tail)

    def set_lr(self, lr: float):
        self.opt_local.set_learning_rate(lr)
        self.opt_split.set_learning_rate(lr)

    # --- named numpy access (FedAvg) ---
    def get(self, names):
        return {n: np.array(self.state.parameters[n].data, copy=True) for n in names}

    def put(self, arrays: dict):
        for n, a in arrays.items():
            self.state.parameters[n] = np.ascontiguousarray(a, dtype=np.float32)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("inf")
    den = np.abs(b).max()
    return float(np.abs(a - b).max() / den) if den > 0 else float(np.abs(a - b).max())


def run_one(cfg_dir, variant, B, timings: dict | None = None):
    meta = json.load(open(os.path.join(cfg_dir, "meta.json")))
    vd = os.path.join(cfg_dir, variant)
    ref = np.load(os.path.join(cfg_dir, f"ref_{REF_OPT[variant]}_b{B}.npz"))
    trainables = meta["trainables"]
    state_names = None
    cl = Client(vd, os.path.join(vd, "checkpoint"))
    if variant in IN_GRAPH:
        state_names = [n for n, _ in cl.state.parameters if n.startswith("opt.")]
    worst: dict[str, float] = {}

    def note(key, a, b):
        worst[key] = max(worst.get(key, 0.0), rel(a, b))

    t_since_reset = 0
    step = 0
    for r, (n_local, n_split) in enumerate(meta["rounds"]):
        if r > 0:
            # FedAvg stand-in: write the aggregated trainables by name
            agg = {n: ref[f"agg{r}.{n}"] for n in trainables}
            if variant in IN_GRAPH:
                cl.put(agg)
                # optimizer reset = zero the in-graph state tensors (+ restart the AdamW step counter)
                cl.put({n: np.zeros_like(cl.state.parameters[n].data) for n in state_names})
            else:
                # ORT's Optimizer has no reset: rebuild everything from a checkpoint saved WITHOUT optimizer state
                t0 = time.perf_counter()
                with tempfile.TemporaryDirectory() as td:
                    ck = os.path.join(td, "ck")
                    CheckpointState.save_checkpoint(cl.state, ck, include_optimizer_state=False)
                    del cl
                    cl = Client(vd, ck)
                worst["reset_rebuild_s"] = time.perf_counter() - t0
                cl.put(agg)
            t_since_reset = 0
        for i in range(n_local + n_split):
            s = f"s{step}."
            local = bool(ref[s + "local"])
            cl.set_lr(float(ref[s + "lr"]))
            x, y = ref[s + "images"], ref[s + "labels"].astype(np.int64)
            t_since_reset += 1
            extra = [np.array([t_since_reset], np.float32)] if variant == "adamw" else []
            if local:
                cl.local.eval()
                note("local eval logits (pre-step)", cl.local(x), ref[s + "logits"])
                cl.local.train()
                outs = cl.local(x, y, *extra)
                loss, logits = outs[0], outs[1]
                cl.opt_local.step()
                cl.local.lazy_reset_grad()
                note("local loss", loss, ref[s + "loss"])
                note("local logits", logits, ref[s + "logits"])
            else:
                tok = cl.front.eval()(x)                        # eval graph: images -> tokens
                note("front tokens (eval)", tok, ref[s + "tokens"])
                outs = cl.tail.train()(ref[s + "features"], y, *extra)
                loss, logits, dfeat = outs[0], outs[1], outs[2]
                outs_f = cl.front.train()(x, ref[s + "upstream"], *extra)
                cl.opt_split.step()
                cl.tail.lazy_reset_grad()
                cl.front.lazy_reset_grad()
                note("split loss", loss, ref[s + "loss"])
                note("split logits", logits, ref[s + "logits"])
                note("split dfeatures", dfeat, ref[s + "dfeatures"])
                note("front tokens (train out)", outs_f[1], ref[s + "tokens"])
            now = cl.get(trainables)
            kind = "local" if local else "split"
            for n in trainables:
                key = f"{kind} params" + (" [attn k-bias]" if n.endswith("attn.qkv.bias") else "")
                if n.endswith("attn.qkv.bias"):
                    # key bias (middle third) has an exactly-zero true gradient: AdamW amplifies float noise there
                    D = now[n].shape[0] // 3
                    note(key, now[n][D:2 * D], ref[s + "param." + n][D:2 * D])
                    idx = np.r_[0:D, 2 * D:3 * D]
                    note(f"{kind} params", now[n][idx], ref[s + "param." + n][idx])
                else:
                    note(key, now[n], ref[s + "param." + n])
            step += 1
    # eval graph of `local` (images -> logits) must match the train graph's logits at the current params
    x = ref["s0.images"]
    ev = cl.local.eval()(x)
    tr_logits = cl.local.train()(x, ref["s0.labels"].astype(np.int64),
                                 *([np.array([1], np.float32)] if variant == "adamw" else []))[1]
    worst["local eval vs train logits"] = rel(ev, tr_logits)   # (this train_step's gradients are never applied)

    if timings is not None:
        xb = np.random.default_rng(0).standard_normal((8, 3, 16, 16)).astype(np.float32)
        yb = np.arange(8, dtype=np.int64) % 5
        fb = np.random.default_rng(1).standard_normal((8, *meta["tokens_shape"])).astype(np.float32)
        ex = [np.array([1], np.float32)] if variant == "adamw" else []

        def best(fn, n=30):
            ts = []
            for _ in range(n):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            return min(ts) * 1e3

        cl.local.train()
        cl.tail.train()
        cl.front.train()
        timings["local_step_b8_ms"] = best(lambda: (cl.local(xb, yb, *ex), cl.opt_local.step()))
        timings["tail_step_b8_ms"] = best(lambda: (cl.tail(fb, yb, *ex), cl.opt_split.step()))
        timings["front_fwd_b8_ms"] = best(lambda: cl.front.eval()(xb))
        cl.front.train()
        timings["front_train_b8_ms"] = best(lambda: cl.front(xb, np.ones((8, *meta["tokens_shape"]), np.float32),
                                                              *ex))
        timings["client_build_s"] = best(lambda: Client(vd, os.path.join(vd, "checkpoint")), n=3) / 1e3
    return worst


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out")
    ap.add_argument("--configs", nargs="+", default=["k0m0", "k1m1"])
    ap.add_argument("--variants", nargs="+", default=["sgdm", "adamw", "native_adamw", "sgd"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 3, 8])
    ap.add_argument("--time", action="store_true")
    a = ap.parse_args()
    print(f"onnxruntime {ort.__version__}, numpy {np.__version__}, torch imported: {'torch' in sys.modules}")
    for c in a.configs:
        for v in a.variants:
            for B in a.batches:
                tim = {} if (a.time and B == 8) else None
                w = run_one(os.path.join(a.out, c), v, B, tim)
                print(f"== {c} {v} B={B}")
                for kk, vv in w.items():
                    print(f"   {kk:32s} {vv:.2e}")
                if tim:
                    print("   timings:", {kk: round(vv, 3) for kk, vv in tim.items()})
    print(f"torch imported: {'torch' in sys.modules}; peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024:.0f} MB")


if __name__ == "__main__":
    main()
