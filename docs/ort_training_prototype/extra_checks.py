"""Extra device-side checks (torch-free): optimizer-state save/restore, contiguous-parameter API on a shared state,
timings at B=8. Run: OMP_NUM_THREADS=1 <ort-training-venv>/bin/python extra_checks.py --out out"""
import argparse, os, sys, tempfile, types, time, resource
sys.modules.setdefault("onnxruntime.training.optim", types.ModuleType("onnxruntime.training.optim"))
import numpy as np
from onnxruntime.training.api import CheckpointState
from device import Client, rel

ap = argparse.ArgumentParser(); ap.add_argument("--out", default="out"); a = ap.parse_args()
rng = np.random.default_rng(0)
for cfg in ["k0m0", "k1m1"]:
    import json
    meta = json.load(open(os.path.join(a.out, cfg, "meta.json")))
    x = rng.standard_normal((3, 3, 16, 16)).astype(np.float32); y = np.array([0, 3, 1], np.int64)
    for v in ["native_adamw", "sgdm", "adamw"]:
        vd = os.path.join(a.out, cfg, v)
        ex = lambda t: [np.array([t], np.float32)] if v == "adamw" else []
        A = Client(vd, os.path.join(vd, "checkpoint"))
        A.set_lr(0.01)
        for t in (1, 2):
            A.local.train()(x, y, *ex(t)); A.opt_local.step(); A.local.lazy_reset_grad()
        with tempfile.TemporaryDirectory() as td:
            ck = os.path.join(td, "ck")
            CheckpointState.save_checkpoint(A.state, ck, include_optimizer_state=True)
            B = Client(vd, ck)
        B.set_lr(0.01)
        for C in (A, B):
            C.local.train()(x, y, *ex(3)); C.opt_local.step(); C.local.lazy_reset_grad()
        pa, pb = A.get(meta["trainables"]), B.get(meta["trainables"])
        err = max(rel(pb[n], pa[n]) for n in pa)
        print(f"{cfg} {v}: step-3 params after save(include_optimizer_state=True)+reload vs uninterrupted: {err:.1e}")
        # contiguous-parameter API with a superset (shared) state
        for name, mod in [("local", A.local), ("front", A.front), ("tail", A.tail)]:
            try:
                buf = mod.get_contiguous_parameters(trainable_only=True)
                print(f"   {name}.get_contiguous_parameters(trainable_only=True): ok, {buf.shape()}")
            except Exception as e:
                print(f"   {name}.get_contiguous_parameters: FAILS: {str(e).splitlines()[0][:160]}")
        # timings at B=8
        xb = rng.standard_normal((8, 3, 16, 16)).astype(np.float32); yb = np.arange(8, dtype=np.int64) % 5
        fb = rng.standard_normal((8, *meta["tokens_shape"])).astype(np.float32)
        def best(fn, n=50):
            ts = []
            for _ in range(n):
                t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
            return min(ts) * 1e3
        A.local.train(); A.tail.train()
        tl = best(lambda: (A.local(xb, yb, *ex(1)), A.opt_local.step()))
        tt = best(lambda: (A.tail(fb, yb, *ex(1)), A.opt_split.step()))
        tf = best(lambda: (A.front.train()(xb, fb[:, :, :] * 0 + 1, *ex(1)), A.opt_split.step()))
        te = best(lambda: A.front.eval()(xb))
        tb = best(lambda: Client(vd, os.path.join(vd, "checkpoint")), n=3)
        print(f"   B=8 ms: local_step {tl:.2f}, tail_step {tt:.2f}, front train_step+opt {tf:.2f}, front eval {te:.2f};"
              f" build 3 Modules+2 Optimizers {tb:.0f} ms")
print(f"torch imported: {'torch' in sys.modules}; peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024:.0f} MB")
