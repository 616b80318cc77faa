"""The `training` backend's files: ONNX Runtime on-device training artifacts built from the forward graphs.

Runs in its own environment (`onnxruntime-training-cpu==1.19.2` + `onnx==1.17.0`, no torch: the two onnxruntime
packages break each other in one environment, and onnx >= 1.18 writes graphs ORT 1.19.2 refuses), called by
`export/bundle.py` as `python -m export.ort_artifacts STAGING`. STAGING holds `manifest.json` (the bundle being
built; its `graphs` name the files to write) and `forward/{front,tail,local}.onnx` from
`export.onnx_graphs.build_forward_graphs`.

What `generate_artifacts` cannot do by itself, and is done here (found with the prototype in
docs/ort_training_prototype/, commit af4a9a8):
- gradient building needs every LayerNormalization to declare its two optional outputs;
- the tail must return dL/dfeatures for the server: `features` is put in requires_grad and its gradient
  accumulator is replaced by a plain output `dfeatures`;
- the prompt update takes the server's gradient: a loss sum(tokens * upstream) (head blocks >= 1), or, with no
  head blocks, sum(prompts * upstream) on a graph that is the prompts alone (upstream = dL/dprompts then);
- the optimizer: ORT's Optimizer graphs are plain SGD and an AdamW without torch's semantics (it hard-codes the
  Hugging Face variant) and keep their state out of reach. So the optimizer's state lives in the training graphs
  (`state.<slot>.<name>` tensors of the checkpoint, written in place), each training graph writes torch.optim's
  update direction into the gradient buffer, and ORT's SGD optimizer applies p -= lr * direction. The state can
  then be read, written and reset by name, like the portable backend's.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from sfp_common.bundle import MANIFEST, Manifest, OptimizerSpec, state_key

FORWARD = "forward"
TRUE = "opt.true"


def import_artifacts():
    """onnxruntime.training's __init__ imports `optim`, whose fp16 wrappers import torch: stub that subpackage."""
    sys.modules.setdefault("onnxruntime.training.optim", types.ModuleType("onnxruntime.training.optim"))
    from onnxruntime.training import artifacts, onnxblock
    return artifacts, onnxblock


def add_layernorm_outputs(model: onnx.ModelProto) -> None:
    for node in model.graph.node:
        if node.op_type == "LayerNormalization" and len(node.output) == 1:
            node.output.extend([node.output[0] + "__mean", node.output[0] + "__invstd"])


def dot_loss(onnxblock, output: str, given: str):
    """loss = sum(output * given), `given` a new input shaped like `output`: its gradient is the chain rule with
    the server's gradient. (Never named `*_grad`: ORT's Module takes such inputs for gradient buffers.)"""
    class Dot(onnxblock.Block):
        def __init__(self) -> None:
            super().__init__()
            self.like = onnxblock.blocks.InputLike(output)
            self.mul = onnxblock.blocks.Mul()
            self.sum = onnxblock.blocks.ReduceSum(keepdims=False)

        def build(self, value):
            return self.sum(self.mul(value, self.like(given)))
    return Dot()


def prompts_only_graph(front: onnx.ModelProto) -> onnx.ModelProto:
    """prompts -> prompts: with no head blocks the server already sent dL/dprompts, so this is all there is."""
    prompts = next(i for i in front.graph.initializer if i.name == "head.prompts")
    shape = list(prompts.dims)
    graph = helper.make_graph([helper.make_node("Identity", ["head.prompts"], ["prompts_out"])], "prompts", [],
                              [helper.make_tensor_value_info("prompts_out", TensorProto.FLOAT, shape)], [prompts])
    model = helper.make_model(graph, opset_imports=list(front.opset_import))
    model.ir_version = front.ir_version
    return model


def expose_input_gradient(train: onnx.ModelProto, name: str, output: str) -> None:
    """Replace the gradient accumulator generate_artifacts gave input `name` by a plain output `output`, placed
    right after the user outputs (ORT's Module drops outputs that parse as `<param>_grad`)."""
    g = train.graph
    buffer = f"{name}_grad.accumulation.buffer"
    buffer_info = next(i for i in g.input if i.name == buffer)
    for node in [n for n in g.node if n.op_type == "InPlaceAccumulatorV2" and n.input[0] == buffer]:
        g.node.remove(node)
    g.input.remove(buffer_info)
    g.output.remove(next(o for o in g.output if o.name == f"{name}_grad.accumulation.out"))
    g.node.append(helper.make_node("Identity", [f"{name}_grad"], [output], name=f"expose_{output}"))
    info = onnx.ValueInfoProto()
    info.CopyFrom(buffer_info)
    info.name = output
    outputs = list(g.output)
    outputs.insert(sum(1 for o in outputs if not o.name.endswith(".accumulation.out")), info)
    del g.output[:]
    g.output.extend(outputs)


def direction_nodes(opt: OptimizerSpec, p: str, g: str, const) -> tuple[list[onnx.NodeProto], dict[str, str]]:
    """torch.optim's update direction u for parameter p with gradient g (p_new = p - lr * u), and the new value
    of each state slot. `step` (a graph input, float [1]) is the number of steps taken before this one.

    SGD (dampening 0): buf' = mu * buf + g + wd * p; u = buf'. A reset state is zeros, so the first step gives
    buf' = g + wd * p, as torch's first step does.
    AdamW: m' = b1 m + (1 - b1) g, v' = b2 v + (1 - b2) g^2, u = wd p + (m' / bc1) / (sqrt(v') / sqrt(bc2) + eps):
    p - lr u = p (1 - lr wd) - lr m_hat / denom, torch's decoupled decay.
    """
    q, state = f"dir.{p}.", {slot: state_key(slot, p) for slot in opt.slots}
    n = helper.make_node
    if opt.name == "sgd":
        nodes = [n("Mul", [const(opt.weight_decay), p], [q + "wdp"]),
                 n("Add", [g, q + "wdp"], [q + "g"]),
                 n("Mul", [const(opt.momentum), state["momentum_buffer"]], [q + "mubuf"]),
                 n("Add", [q + "mubuf", q + "g"], [q + "u"])]
        return nodes, {"momentum_buffer": q + "u"}
    b1, b2 = opt.betas
    nodes = [n("Mul", [const(b1), state["exp_avg"]], [q + "b1m"]),
             n("Mul", [const(1 - b1), g], [q + "gb1"]),
             n("Add", [q + "b1m", q + "gb1"], [q + "m"]),
             n("Mul", [const(b2), state["exp_avg_sq"]], [q + "b2v"]),
             n("Mul", [g, g], [q + "gg"]),
             n("Mul", [const(1 - b2), q + "gg"], [q + "gb2"]),
             n("Add", [q + "b2v", q + "gb2"], [q + "v"]),
             n("Sqrt", [q + "v"], [q + "sv"]),
             n("Div", [q + "sv", "dir.bc2s"], [q + "svc"]),
             n("Add", [q + "svc", const(opt.eps)], [q + "den"]),
             n("Div", [q + "m", "dir.bc1"], [q + "mh"]),
             n("Div", [q + "mh", q + "den"], [q + "upd"]),
             n("Mul", [const(opt.weight_decay), p], [q + "wdp"]),
             n("Add", [q + "upd", q + "wdp"], [q + "u"])]
    return nodes, {"exp_avg": q + "m", "exp_avg_sq": q + "v"}


def optimizer_in_graph(train: onnx.ModelProto, evaluation: onnx.ModelProto, opt: OptimizerSpec,
                       trainables: list[str]) -> None:
    """Give the training graph torch.optim's state and direction (see the module docstring). The state inputs
    are `state.<slot>.<name>` (checkpoint tensors, not trained) written in place by InPlaceAccumulatorV2 with
    overwrite on (its CPU kernel writes into the buffer it is fed); the gradient accumulators are switched to
    overwrite and fed u, so the buffer holds this step's direction, not a sum."""
    g = train.graph
    constants: dict[float, str] = {}
    initializers = [numpy_helper.from_array(np.array([True]), TRUE)]

    def const(value: float) -> str:
        if value not in constants:
            constants[value] = f"opt.c{len(constants)}"
            initializers.append(numpy_helper.from_array(np.array([value], np.float32), constants[value]))
        return constants[value]

    nodes: list[onnx.NodeProto] = []
    if opt.name == "adamw":
        g.input.append(helper.make_tensor_value_info("step", TensorProto.FLOAT, [1]))
        b1, b2 = opt.betas
        nodes += [helper.make_node("Add", ["step", const(1.0)], ["dir.t"]),
                  helper.make_node("Pow", [const(b1), "dir.t"], ["dir.b1t"]),
                  helper.make_node("Sub", [const(1.0), "dir.b1t"], ["dir.bc1"]),
                  helper.make_node("Pow", [const(b2), "dir.t"], ["dir.b2t"]),
                  helper.make_node("Sub", [const(1.0), "dir.b2t"], ["dir.bc2"]),
                  helper.make_node("Sqrt", ["dir.bc2"], ["dir.bc2s"])]
    inputs = {i.name: i for i in g.input}
    accumulators = [n for n in g.node if n.op_type == "InPlaceAccumulatorV2"]
    state_inputs, done = [], []
    for acc in accumulators:
        grad = acc.input[1]
        param = grad[: -len("_grad")]
        if param not in trainables:
            raise RuntimeError(f"the training graph has a gradient for {param}, which is not a trainable")
        direction, new_state = direction_nodes(opt, param, grad, const)
        nodes += direction
        for slot, value in new_state.items():
            info = onnx.ValueInfoProto()
            info.CopyFrom(inputs[param])
            info.name = state_key(slot, param)
            state_inputs.append(info)
            nodes.append(helper.make_node("InPlaceAccumulatorV2", [info.name, value, TRUE],
                                          [f"dir.{param}.{slot}.written"], domain="com.microsoft"))
            done.append(f"dir.{param}.{slot}.written")
        acc.input[1], acc.input[2] = f"dir.{param}.u", TRUE
    g.input.extend(state_inputs)
    for node in nodes:
        node.name = node.name or f"opt_{node.output[0]}"
    for acc in accumulators:     # keep the graph topologically ordered: accumulators after their inputs
        g.node.remove(acc)
    g.node.extend(nodes + accumulators)
    g.initializer.extend(initializers)
    # The state writes must reach a graph output, or they could be pruned as dead code.
    g.node.append(helper.make_node("Concat", done, ["optimizer_state_written"], axis=0, name="state_written"))
    g.output.append(helper.make_tensor_value_info("optimizer_state_written", TensorProto.BOOL, [len(done)]))
    # ORT's Module feeds the eval graph the training graph's parameter list by position: same inputs, same order.
    evaluation.graph.input.extend(state_inputs)


def prune_to(model: onnx.ModelProto, outputs: list[str]) -> None:
    """Keep `outputs` and what computes them; keep every parameter input (names with a dot), in order."""
    g = model.graph
    kept = [o for o in g.output if o.name in outputs]
    del g.output[:]
    g.output.extend(kept)
    need, nodes = set(outputs), []
    for node in reversed(list(g.node)):
        if any(o in need for o in node.output):
            nodes.append(node)
            need.update(i for i in node.input if i)
    del g.node[:]
    g.node.extend(reversed(nodes))
    inputs = [i for i in g.input if i.name in need or "." in i.name]
    del g.input[:]
    g.input.extend(inputs)
    initializers = [i for i in g.initializer if i.name in need]
    del g.initializer[:]
    g.initializer.extend(initializers)


def build(staging: Path) -> None:
    """Write the artifact files the staged manifest names; remove the forward graphs."""
    artifacts, onnxblock = import_artifacts()
    manifest = Manifest.from_json((staging / MANIFEST).read_text())
    opt, files = manifest.optimizer, manifest.graphs
    prompts, tail = manifest.trainable_names("prompts"), manifest.trainable_names("tail")
    forward = {name: onnx.load(staging / FORWARD / f"{name}.onnx") for name in ("front", "tail", "local")}
    for model in forward.values():
        add_layernorm_outputs(model)
    ce = artifacts.LossType.CrossEntropyLoss
    with tempfile.TemporaryDirectory(dir=staging) as work:
        work = Path(work)

        def generate(prefix: str, model: onnx.ModelProto, trainable: list[str], loss, input_grads: list[str],
                     outputs: list[str]) -> tuple[onnx.ModelProto, onnx.ModelProto]:
            """(training graph, eval graph = the plain forward) of one ORT module."""
            artifacts.generate_artifacts(model, requires_grad=trainable + input_grads, frozen_params=[], loss=loss,
                                         optimizer=artifacts.OptimType.SGD, artifact_directory=work,
                                         prefix=f"{prefix}_", additional_output_names=outputs)
            train, evaluation = (onnx.load(work / f"{prefix}_{kind}_model.onnx") for kind in ("training", "eval"))
            for x in input_grads:
                expose_input_gradient(train, x, "d" + x)
            prune_to(evaluation, outputs)
            return train, evaluation

        modules = {
            "local": (generate("local", forward["local"], prompts + tail, ce, [], ["logits"]), prompts + tail),
            "tail": (generate("tail", forward["tail"], tail, ce, ["features"], ["logits"]), tail),
            "front": (generate("front", forward["front"], prompts, dot_loss(onnxblock, "tokens", "upstream"), [],
                               ["tokens"]), prompts),
        }
        if manifest.prompt_gradient_only:
            # the prompt update is sum(prompts * dL/dprompts); smashing stays the front's forward graph
            train, _ = generate("prompts", prompts_only_graph(forward["front"]), prompts,
                                dot_loss(onnxblock, "prompts_out", "upstream"), [], ["prompts_out"])
            modules["front"] = ((train, modules["front"][0][1]), prompts)
        for name, ((train, evaluation), trainable) in modules.items():
            optimizer_in_graph(train, evaluation, opt, trainable)
            onnx.checker.check_model(train)
            onnx.save(train, staging / files[f"{name}_training"])
            onnx.save(evaluation, staging / files[f"{name}_eval"])
        shutil.copyfile(work / "local_optimizer_model.onnx", staging / files["optimizer"])
        # One checkpoint for all graphs: the trainables, and the optimizer state as untrained zeros.
        values = {i.name: i for i in forward["local"].graph.initializer}
        trained = [values[n] for n in prompts + tail]
        state = [numpy_helper.from_array(np.zeros(tuple(values[n].dims), np.float32), state_key(slot, n))
                 for slot in opt.slots for n in prompts + tail]
        onnxblock.save_checkpoint((trained, state), str(staging / files["checkpoint"]))
    shutil.rmtree(staging / FORWARD)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("staging", type=Path)
    build(ap.parse_args().staging)
    if "torch" in sys.modules:
        raise SystemExit("torch was imported while building the training artifacts")


if __name__ == "__main__":
    main()
