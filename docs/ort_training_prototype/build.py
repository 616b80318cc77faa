"""Builder for the ORT on-device-training backend (prototype, research only).

Two stages, because the two halves need different environments (exactly as the product would be split):

  Stage 1 `export`    (env with torch: <torch-venv>, PYTHONPATH=<repo>)
      - builds the tiny split ViT for each config (head_blocks, tail_blocks),
      - exports three *forward* ONNX graphs with torch.onnx.export(dynamo=True, optimize=False, opset 18):
          front.onnx  images -> tokens            (head; trainable: head.prompts)
          tail.onnx   features -> logits          (tail; trainable: tail.*)
          local.onnx  images -> logits            (head -> mean of tokens -> tail, cls pool)
        parameters stay initializers named by their PyTorch names,
      - runs the PyTorch reference (autograd + torch.optim) for the parity protocol and saves every input and
        expected output to ref_<opt>_b<B>.npz.

  Stage 2 `artifacts` (env with onnx==1.17.0 + onnxruntime-training-cpu==1.19.2, NO torch: <ort-training-venv>)
      - post-processes the forward graphs (LayerNormalization optional outputs),
      - generate_artifacts() for each graph, then post-processes the training/eval/optimizer graphs
        (dL/dfeatures output, in-graph optimizer state for momentum-SGD / AdamW-in-graph, adam_mode=0),
      - merges the per-graph checkpoints into one shared checkpoint.

Usage:
  OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 PYTHONPATH=<repo> <torch-venv>/bin/python build.py export --out out
  OMP_NUM_THREADS=1 <ort-training-venv>/bin/python build.py artifacts --out out
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import types

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONFIGS = [(0, 0), (1, 1)]
BATCHES = [1, 3, 8]
HP = dict(lr=0.01, lr_split=0.005, weight_decay=0.05, momentum=0.9, betas=(0.9, 0.999), eps=1e-8)
# Parity protocol, per (config, optimizer, batch): round 1 = 3 local steps (lr) + 3 split steps (lr_split),
# then "FedAvg" (params <- 0.9 * params + 0.001, written by name) and an optimizer reset, round 2 = 2 local + 2 split.
ROUNDS = [(3, 3), (2, 2)]
EXPORT_B = 4
OPTS = ["sgdm", "adamw", "sgd"]   # sgd = plain SGD (no momentum, no wd): ORT's native SGD


# =============================================================================================== stage 1: torch
def stage_export(out: str) -> None:
    import numpy as np
    import timm
    import torch
    from torch import nn
    from torch.export import Dim

    from export.split import SplitSpec, SplitViT

    torch.set_num_threads(1)

    def make_model(k, m, embed_dim=32, depth=4, heads=2, img=16, patch=4, classes=5, prompts=3, seed=0):
        # Same tiny ViT as docs/onnx_train_step_prototype.py make_model (fused attention disabled).
        torch.manual_seed(seed)
        timm.layers.set_fused_attn(False)
        vit = timm.create_model("vit_base_patch16_224", pretrained=False, embed_dim=embed_dim, depth=depth,
                                num_heads=heads, img_size=img, patch_size=patch, num_classes=classes)
        for blk in vit.blocks:
            blk.attn.fused_attn = False
        with torch.no_grad():  # non-trivial biases / norm params so zero-initialised tensors do not hide bugs
            for name, p in vit.named_parameters():
                if name.endswith("bias") or "norm" in name:
                    p.add_(0.02 * torch.randn_like(p))
        vit.eval()
        return SplitViT(vit, SplitSpec(prompts=prompts, head_blocks=k, tail_blocks=m))

    # Forward modules; attribute names keep the PyTorch parameter names ("head.prompts", "tail....").
    class Front(nn.Module):
        def __init__(self, sv):
            super().__init__()
            self.head = sv.head

        def forward(self, images):
            return self.head(images)

    class TailFwd(nn.Module):
        def __init__(self, sv):
            super().__init__()
            self.tail = sv.tail

        def forward(self, features):
            return self.tail(features)

    class LocalFwd(nn.Module):
        def __init__(self, sv):
            super().__init__()
            self.head, self.tail = sv.head, sv.tail

        def forward(self, images):
            return SplitViT.tail_local(self, self.head(images))

    def export(module, example, in_name, out_name, path):
        module.eval()
        prog = torch.onnx.export(module, (example.clone(),), dynamo=True, optimize=False, opset_version=18,
                                 dynamic_shapes=({0: Dim("batch", min=1, max=4096)},),
                                 input_names=[in_name], output_names=[out_name])
        prog.save(path)

    def ce(logits, labels):
        return torch.nn.functional.cross_entropy(logits, labels)   # reference only (not exported)

    for k, m in CONFIGS:
        d = os.path.join(out, f"k{k}m{m}")
        os.makedirs(d, exist_ok=True)
        sv = make_model(k, m)
        for p in sv.parameters():
            p.requires_grad_(False)
        trainables = ["head.prompts"] + sv.trainable_names(("tail",))
        imgs = torch.randn(EXPORT_B, 3, 16, 16)
        with torch.no_grad():
            feats = sv.body(sv.head(imgs))
        export(Front(sv), imgs, "images", "tokens", os.path.join(d, "front.onnx"))
        export(TailFwd(sv), feats, "features", "logits", os.path.join(d, "tail.onnx"))
        export(LocalFwd(sv), imgs, "images", "logits", os.path.join(d, "local.onnx"))
        meta = dict(trainables=trainables, prompts=["head.prompts"],
                    tail=sv.trainable_names(("tail",)), hp=HP, rounds=ROUNDS, batches=BATCHES,
                    tokens_shape=list(feats.shape[1:]))
        with open(os.path.join(d, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)

        init = {n: p.detach().clone() for n, p in sv.named_parameters()}
        for opt_name in OPTS:
            for B in BATCHES:
                sv.load_state_dict(init)
                named = dict(sv.named_parameters())
                params = [named[n] for n in trainables]
                for p in params:
                    p.requires_grad_(True)
                g = torch.Generator().manual_seed(1000 + B)
                rec = {}

                def new_opt():
                    if opt_name == "sgd":
                        return torch.optim.SGD(params, lr=HP["lr"])
                    if opt_name == "sgdm":
                        return torch.optim.SGD(params, lr=HP["lr"], momentum=HP["momentum"],
                                               weight_decay=HP["weight_decay"])
                    return torch.optim.AdamW(params, lr=HP["lr"], betas=HP["betas"], eps=HP["eps"],
                                             weight_decay=HP["weight_decay"])

                step = 0
                for r, (n_local, n_split) in enumerate(ROUNDS):
                    if r > 0:   # FedAvg stand-in + optimizer reset (new torch optimizer = zero state, step 0)
                        with torch.no_grad():
                            for n, p in zip(trainables, params):
                                p.mul_(0.9).add_(0.001)
                                rec[f"agg{r}.{n}"] = p.detach().numpy().copy()
                    opt = new_opt()
                    for i in range(n_local + n_split):
                        local = i < n_local
                        lr = HP["lr"] if local else HP["lr_split"]
                        for gr in opt.param_groups:
                            gr["lr"] = lr
                        x = torch.randn(B, 3, 16, 16, generator=g)
                        y = torch.randint(0, 5, (B,), generator=g)
                        opt.zero_grad(set_to_none=True)
                        s = f"s{step}."
                        rec[s + "images"], rec[s + "labels"] = x.numpy(), y.numpy()
                        if local:
                            logits = sv.forward_local(x)
                            loss = ce(logits, y)
                            loss.backward()
                        else:
                            tokens = sv.head(x)                        # device: front
                            t_in = tokens.detach().requires_grad_(True)
                            feats = sv.body(t_in)                      # server: body forward
                            f_in = feats.detach().requires_grad_(True)
                            logits = sv.tail(f_in)                     # device: tail step
                            loss = ce(logits, y)
                            loss.backward()
                            feats.backward(f_in.grad)                  # server: body backward -> dL/dtokens
                            tokens.backward(t_in.grad)                 # device: prompt step
                            rec[s + "tokens"] = tokens.detach().numpy()
                            rec[s + "features"] = f_in.detach().numpy()
                            rec[s + "dfeatures"] = f_in.grad.numpy()
                            rec[s + "upstream"] = t_in.grad.numpy()
                        rec[s + "local"] = np.array(local)
                        rec[s + "lr"] = np.array(lr, dtype=np.float32)
                        rec[s + "loss"] = loss.detach().numpy()
                        rec[s + "logits"] = logits.detach().numpy()
                        opt.step()
                        for n, p in zip(trainables, params):
                            rec[s + "param." + n] = p.detach().numpy().copy()
                        step += 1
                rec["nsteps"] = np.array(step)
                np.savez(os.path.join(d, f"ref_{opt_name}_b{B}.npz"), **rec)
        print(f"k{k}m{m}: exported + references written to {d}")


# =============================================================================================== stage 2: ORT
def import_ort_training():
    """onnxruntime/training/__init__.py imports `optim`, whose fp16 modules `import torch`. Register an empty stub
    for that one subpackage before importing, so artifacts / onnxblock / api load without torch."""
    sys.modules.setdefault("onnxruntime.training.optim", types.ModuleType("onnxruntime.training.optim"))
    from onnxruntime.training import artifacts, onnxblock
    return artifacts, onnxblock


def add_layernorm_outputs(model) -> int:
    """Gradient building needs LayerNormalization's two optional outputs (Mean, InvStdDev) to exist."""
    n = 0
    for node in model.graph.node:
        if node.op_type == "LayerNormalization" and len(node.output) == 1:
            node.output.extend([node.output[0] + "__mean", node.output[0] + "__invstd"])
            n += 1
    return n


def make_upstream_loss(onnxblock):
    class UpstreamDot(onnxblock.Block):
        """loss = sum(tokens * upstream); `upstream` (the server's dL/dtokens) becomes a graph input shaped like
        tokens. Its gradient w.r.t. the prompts is exactly the chain rule with the server's gradient."""

        def __init__(self):
            super().__init__()
            self.like = onnxblock.blocks.InputLike("tokens")
            self.mul = onnxblock.blocks.Mul()
            self.sum = onnxblock.blocks.ReduceSum(keepdims=False)

        def build(self, tokens):
            upstream = self.like("upstream")
            return self.sum(self.mul(tokens, upstream))
    return UpstreamDot()


def expose_input_grad(train, input_name: str, out_name: str) -> None:
    """Training graph built with `input_name` in requires_grad: generate_artifacts gave it a gradient accumulation
    buffer like a parameter (input '<x>_grad.accumulation.buffer', an InPlaceAccumulatorV2 node, output
    '<x>_grad.accumulation.out'). Remove those three and instead return '<x>_grad' as a plain graph output, via an
    Identity named `out_name` (Module drops outputs whose name parses as '<param>_grad')."""
    import onnx
    g = train.graph
    buf, acc_out, grad = f"{input_name}_grad.accumulation.buffer", f"{input_name}_grad.accumulation.out", \
        f"{input_name}_grad"
    buf_vi = next(i for i in g.input if i.name == buf)
    [g.node.remove(n) for n in [n for n in g.node if n.op_type == "InPlaceAccumulatorV2" and n.input[0] == buf]]
    g.input.remove(buf_vi)
    g.output.remove(next(o for o in g.output if o.name == acc_out))
    g.node.append(onnx.helper.make_node("Identity", [grad], [out_name], name=f"expose_{out_name}"))
    vi = onnx.ValueInfoProto()
    vi.CopyFrom(buf_vi)
    vi.name = out_name
    # insert right after the user outputs (before the accumulation flags)
    outs = list(g.output)
    n_user = sum(1 for o in outs if not o.name.endswith(".accumulation.out"))
    outs.insert(n_user, vi)
    del g.output[:]
    g.output.extend(outs)


def in_graph_optimizer(train, eval_model, trainables, opt: str, hp: dict) -> list:
    """Moves the optimizer's *state* into the training graph, so it lives in the (shared) CheckpointState as frozen
    parameters, and writes the optimizer's update direction u into the gradient buffer; the standard SGD optimizer
    graph (SGDOptimizerV2: p -= lr * u) then applies it. This is how momentum SGD (not supported by ORT's Optimizer:
    only AdamWOptimizer and SGDOptimizerV2 graphs are accepted, and SGDOptimizerV2 has no state) is done.

    For each trainable p with gradient g (the '<p>_grad' tensor feeding InPlaceAccumulatorV2):
      sgdm:  buf' = mu*buf + g' with g' = g + wd*p;    u = buf'            (torch.optim.SGD)
      adamw: m' = b1*m + (1-b1) g; v' = b2*v + (1-b2) g^2;  u = wd*p + (m'/bc1) / (sqrt(v')/sqrt(bc2) + eps)
             with bc = 1 - b^t and t = the user input 'opt_t' (float [1], the 1-based step number) ->
             p - lr*u = p(1 - lr*wd) - lr*m_hat/denom                                       (torch.optim.AdamW)
    State tensors are inputs named 'opt.<slot>.<p>' (frozen checkpoint parameters) and are updated in place with
    InPlaceAccumulatorV2(state, new, overwrite=True), whose CPU kernel writes into the fed buffer. The gradient
    accumulator is switched to overwrite mode (its reset input is forced true) so the buffer holds u, not a sum.
    Returns the state parameter names (to add to the checkpoint as frozen, zero-initialised parameters).
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    g = train.graph
    inits = []
    const = {}

    def c(name, value):
        if name not in const:
            const[name] = f"optc.{name}"
            inits.append(numpy_helper.from_array(np.array([value], dtype=np.float32), const[name]))
        return const[name]

    new_nodes, state_names = [], []
    true_name = "optc.true"
    inits.append(numpy_helper.from_array(np.array([True]), true_name))
    if opt == "adamw":
        g.input.append(helper.make_tensor_value_info("opt_t", TensorProto.FLOAT, [1]))
        b1, b2 = hp["betas"]
        # bc1 = 1 - b1^t, bc2s = sqrt(1 - b2^t)
        new_nodes += [
            helper.make_node("Pow", [c("b1", b1), "opt_t"], ["opt.b1t"]),
            helper.make_node("Sub", [c("one", 1.0), "opt.b1t"], ["opt.bc1"]),
            helper.make_node("Pow", [c("b2", b2), "opt_t"], ["opt.b2t"]),
            helper.make_node("Sub", [c("one", 1.0), "opt.b2t"], ["opt.bc2"]),
            helper.make_node("Sqrt", ["opt.bc2"], ["opt.bc2s"]),
        ]
    slots = {"sgdm": ["momentum_buffer"], "adamw": ["exp_avg", "exp_avg_sq"]}[opt]
    pin = {i.name: i for i in g.input}
    for acc in [n for n in g.node if n.op_type == "InPlaceAccumulatorV2"]:
        buf, grad, reset = acc.input
        pname = grad[: -len("_grad")]
        assert pname in trainables, pname
        st = {s: f"opt.{s}.{pname}" for s in slots}
        for s, sn in st.items():
            vi = onnx.ValueInfoProto()
            vi.CopyFrom(pin[pname])
            vi.name = sn
            g.input.append(vi)
            state_names.append(sn)
        q = f"opt.{pname}."
        if opt == "sgdm":
            new_nodes += [
                helper.make_node("Mul", [c("wd", hp["weight_decay"]), pname], [q + "wdp"]),
                helper.make_node("Add", [grad, q + "wdp"], [q + "g2"]),
                helper.make_node("Mul", [c("mu", hp["momentum"]), st["momentum_buffer"]], [q + "mubuf"]),
                # after a reset the state is zeros, so mu*0 + g' == g' exactly (torch: buffer None -> clone(g')).
                # Module's lazy_reset_grad flag is NOT used: it is true on each Module's first train_step, which
                # would drop the momentum carried over from another Module sharing the state.
                helper.make_node("Add", [q + "mubuf", q + "g2"], [q + "u"]),
                helper.make_node("InPlaceAccumulatorV2", [st["momentum_buffer"], q + "u", true_name],
                                 [q + "state_done"], domain="com.microsoft"),
            ]
        else:
            m, v = st["exp_avg"], st["exp_avg_sq"]
            new_nodes += [
                helper.make_node("Mul", [c("b1", hp["betas"][0]), m], [q + "b1m"]),
                helper.make_node("Mul", [c("1mb1", 1 - hp["betas"][0]), grad], [q + "gb1"]),
                helper.make_node("Add", [q + "b1m", q + "gb1"], [q + "m"]),
                helper.make_node("Mul", [c("b2", hp["betas"][1]), v], [q + "b2v"]),
                helper.make_node("Mul", [grad, grad], [q + "gg"]),
                helper.make_node("Mul", [c("1mb2", 1 - hp["betas"][1]), q + "gg"], [q + "gb2"]),
                helper.make_node("Add", [q + "b2v", q + "gb2"], [q + "v"]),
                helper.make_node("Sqrt", [q + "v"], [q + "sv"]),
                helper.make_node("Div", [q + "sv", "opt.bc2s"], [q + "svc"]),
                helper.make_node("Add", [q + "svc", c("eps", hp["eps"])], [q + "den"]),
                helper.make_node("Div", [q + "m", "opt.bc1"], [q + "mh"]),
                helper.make_node("Div", [q + "mh", q + "den"], [q + "upd"]),
                helper.make_node("Mul", [c("wd", hp["weight_decay"]), pname], [q + "wdp"]),
                helper.make_node("Add", [q + "upd", q + "wdp"], [q + "u"]),
                helper.make_node("InPlaceAccumulatorV2", [m, q + "m", true_name], [q + "m_done"],
                                 domain="com.microsoft"),
                helper.make_node("InPlaceAccumulatorV2", [v, q + "v", true_name], [q + "v_done"],
                                 domain="com.microsoft"),
            ]
        # gradient buffer <- u (overwrite)
        acc.input[1] = q + "u"
        acc.input[2] = true_name
    for n in new_nodes:
        n.name = n.name or ("opt_" + n.output[0])
    g.node.extend(new_nodes)
    # keep the graph topologically sorted: the (re-wired) gradient accumulators go after the new nodes
    accs = [n for n in g.node if n.op_type == "InPlaceAccumulatorV2" and n.input[0].endswith(".accumulation.buffer")]
    for n in accs:
        g.node.remove(n)
    g.node.extend(accs)
    g.initializer.extend(inits)
    # The state writers' 'done' flags must reach a graph output (a node whose outputs reach no graph output may be
    # dropped): concatenate them into one extra output 'opt_state_done' [n_state] bool.
    flags = [n.output[0] for n in new_nodes if n.op_type == "InPlaceAccumulatorV2"]
    g.node.append(helper.make_node("Concat", flags, ["opt_state_done"], axis=0, name="opt_state_done"))
    g.output.append(helper.make_tensor_value_info("opt_state_done", TensorProto.BOOL, [len(flags)]))
    # Module feeds the same parameter list (train-graph order) to the eval graph: the eval graph must declare the
    # state inputs too, in the same order (they are unused there).
    if eval_model is not None:
        for sn in state_names:
            vi = onnx.ValueInfoProto()
            vi.CopyFrom(next(i for i in g.input if i.name == sn))
            eval_model.graph.input.append(vi)
    return state_names


def prune_to_outputs(model, keep_outputs) -> None:
    """Keep only `keep_outputs` as graph outputs, drop nodes that do not feed them, and drop graph inputs that are
    no longer consumed *unless* they are parameters (Module feeds the train graph's parameter list to the eval
    graph positionally, so parameter inputs must stay, in order)."""
    g = model.graph
    outs = [o for o in g.output if o.name in keep_outputs]
    del g.output[:]
    g.output.extend(outs)
    need = set(keep_outputs)
    keep = []
    for n in reversed(list(g.node)):
        if any(o in need for o in n.output):
            keep.append(n)
            need.update(i for i in n.input if i)
    del g.node[:]
    g.node.extend(reversed(keep))
    inits = {i.name for i in g.initializer}
    params_like = lambda name: "." in name  # noqa: E731  (PyTorch parameter names; user inputs have no dots)
    ins = [i for i in g.input if i.name in need or params_like(i.name)]
    del g.input[:]
    g.input.extend(ins)
    used_inits = [i for i in g.initializer if i.name in need]
    del g.initializer[:]
    g.initializer.extend(used_inits)
    _ = inits


def set_adam_mode(optim_model, hp) -> None:
    """onnxblock.optim.AdamW hard-codes adam_mode=1 (HuggingFace: eps inside the bias-corrected step size, decay
    after the update). adam_mode=0 is torch.optim.AdamW. eps/weight_decay are attributes (baked in)."""
    for n in optim_model.graph.node:
        if n.op_type == "AdamWOptimizer":
            for a in n.attribute:
                if a.name == "adam_mode":
                    a.i = 0


def stage_artifacts(out: str, native_adam_mode: int = 0) -> None:
    import logging
    import numpy as np
    import onnx

    artifacts, onnxblock = import_ort_training()
    import onnxruntime
    onnxruntime.set_default_logger_severity(3)
    assert "torch" not in sys.modules, "torch was imported"
    logging.basicConfig(level=logging.WARNING)

    for k, m in CONFIGS:
        d = os.path.join(out, f"k{k}m{m}")
        meta = json.load(open(os.path.join(d, "meta.json")))
        hp = meta["hp"]
        specs = {  # graph: (trainables, extra requires_grad inputs, loss, extra outputs)
            "front": (meta["prompts"], [], "upstream", ["tokens"]),
            "tail": (meta["tail"], ["features"], "ce", ["logits"]),
            "local": (meta["trainables"], [], "ce", ["logits"]),
        }
        # Variants: "sgdm"/"adamw" = in-graph optimizer state + SGD optimizer graph;
        #           "native_adamw" = ORT's AdamWOptimizer graph (adam_mode patched to 0); "sgd" = plain SGD, no wd.
        for variant in ["sgdm", "adamw", "native_adamw", "sgd"]:
            vd = os.path.join(d, variant)
            os.makedirs(vd, exist_ok=True)
            all_train, all_frozen = {}, {}
            for name, (train_names, extra_grad, loss, extra_out) in specs.items():
                fwd = onnx.load(os.path.join(d, f"{name}.onnx"))
                add_layernorm_outputs(fwd)
                inits = {i.name for i in fwd.graph.initializer}
                missing = [t for t in train_names if t not in inits]
                assert not missing, (name, missing)
                loss_block = make_upstream_loss(onnxblock) if loss == "upstream" else \
                    artifacts.LossType.CrossEntropyLoss
                if variant == "native_adamw":
                    optim = onnxblock.optim.AdamW(betas=tuple(hp["betas"]), eps=hp["eps"],
                                                  weight_decay=hp["weight_decay"])
                else:
                    optim = artifacts.OptimType.SGD
                artifacts.generate_artifacts(
                    fwd, requires_grad=train_names + extra_grad, frozen_params=[], loss=loss_block,
                    optimizer=optim, artifact_directory=vd, prefix=f"{name}_",
                    additional_output_names=extra_out)
                tp = os.path.join(vd, f"{name}_training_model.onnx")
                ep = os.path.join(vd, f"{name}_eval_model.onnx")
                train, ev = onnx.load(tp), onnx.load(ep)
                for x in extra_grad:
                    expose_input_grad(train, x, "d" + x)        # features -> output 'dfeatures'
                # eval graph = plain forward: outputs [tokens] / [logits] only; no loss, no labels/upstream input
                prune_to_outputs(ev, extra_out)
                if variant in ("sgdm", "adamw"):
                    states = in_graph_optimizer(train, ev, train_names, variant, hp)
                    for sn in states:
                        pn = sn.split(".", 2)[2]
                        all_frozen[sn] = next(i for i in fwd.graph.initializer if i.name == pn)
                onnx.checker.check_model(train)
                onnx.save(train, tp)
                onnx.save(ev, ep)
                if variant == "native_adamw":
                    om = onnx.load(os.path.join(vd, f"{name}_optimizer_model.onnx"))
                    if native_adam_mode == 0:
                        set_adam_mode(om, hp)
                    onnx.save(om, os.path.join(vd, f"{name}_optimizer_model.onnx"))
                for i in fwd.graph.initializer:
                    if i.name in train_names:
                        all_train[i.name] = i
            # One shared checkpoint: all trainables (prompts + tail) + optimizer-state tensors (frozen, zeros).
            trainable = [all_train[n] for n in meta["trainables"]]
            frozen = []
            for sn, like in all_frozen.items():
                z = onnx.numpy_helper.from_array(np.zeros(onnx.numpy_helper.to_array(like).shape, np.float32), sn)
                frozen.append(z)
            onnxblock.save_checkpoint((trainable, frozen), os.path.join(vd, "checkpoint"))
            print(f"k{k}m{m}/{variant}: artifacts written ({len(trainable)} trainables, {len(frozen)} state)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("stage", choices=["export", "artifacts"])
    ap.add_argument("--out", default="out")
    ap.add_argument("--native-adam-mode", type=int, default=0, help="1 reproduces onnxblock's HF-mode default")
    a = ap.parse_args()
    if a.stage == "export":
        stage_export(a.out)
    else:
        stage_artifacts(a.out, a.native_adam_mode)
