"""The client slice as ONNX: train-step graphs for the `portable` backend, forward graphs for the `training` one.

Each training graph is one optimizer step: forward, backward to the trainables and the update, with the
trainables and the optimizer state as graph inputs and their new values as outputs (frozen weights are
initializers). The route (see docs/onnx-train-step-prototype.md for how it was found):

    torch.export.export(loss module) -> _export_forward_backward (joint graph, core ATen)
    -> `Lifted`: trainables and optimizer state become explicit inputs, a hand-written update is appended
    -> torch.onnx.export(dynamo=True, optimize=False, opset 18)

Three exporter behaviours give wrong numbers with no error, and are avoided here: `optimize=True` deletes AdamW's
`+ eps`; the same tensor object passed as two example inputs becomes one input; the ONNX `nll_loss` conversion
scales the gradient by the batch (cross-entropy is written by hand). The exporter's check against PyTorch
(`export/verify.py`) is what proves a bundle is free of them.
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import timm
import torch
from torch import nn
from torch.export import Dim
from torch.export.experimental import _export_forward_backward
from torch.export.graph_signature import InputKind, OutputKind

from export.split import SplitViT
from sfp_common.bundle import EMBED, NEW, OptimizerSpec, param_key, state_key

OPSET = 18
EXPORT_BATCH = 4     # the example batch; graphs take any batch, and are verified at others
MAX_BATCH = 4096


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy written with log_softmax: ONNX's nll_loss conversion scales its gradient by B."""
    onehot = (labels[:, None] == torch.arange(logits.shape[1], device=logits.device)[None]).to(logits.dtype)
    return -(torch.log_softmax(logits, dim=1) * onehot).sum() / logits.shape[0]


# ------------------------------------------------------------------------------------------ what each graph computes
class Front(nn.Module):
    def __init__(self, model: SplitViT) -> None:
        super().__init__()
        self.head = model.head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(images)


class Embed(nn.Module):
    """The frozen patch + position embedding alone: with no head blocks the smashed tokens are these with the
    prompts put in (`Head.attach_prompts`), so a device computes them once per sample per round."""

    def __init__(self, model: SplitViT) -> None:
        super().__init__()
        self.head = model.head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head.embed(images)


class TailLogits(nn.Module):
    def __init__(self, model: SplitViT) -> None:
        super().__init__()
        self.tail = model.tail

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.tail(features)


class TailLoss(TailLogits):
    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.tail(features)
        return cross_entropy(logits, labels), logits.detach()


class PromptLoss(Front):
    """sum(head(images) * upstream): its prompt gradient is the chain rule through the server's dL/dtokens.

    The input is named `upstream`, not `*_grad`: ONNX Runtime's training tools take such names for gradients.
    """

    def forward(self, images: torch.Tensor, upstream: torch.Tensor) -> tuple[torch.Tensor]:
        return ((self.head(images) * upstream).sum(),)


class LocalLogits(nn.Module):
    def __init__(self, model: SplitViT) -> None:
        super().__init__()
        self.head, self.tail = model.head, model.tail

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return SplitViT.tail_local(self, self.head(images))


class LocalLoss(LocalLogits):
    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = SplitViT.tail_local(self, self.head(images))
        return cross_entropy(logits, labels), logits.detach()


# ------------------------------------------------------------------------------------------ optimizer updates
def sgd_update(opt: OptimizerSpec, p: torch.Tensor, g: torch.Tensor, state: list[torch.Tensor], step: torch.Tensor,
               lr: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """torch.optim.SGD (dampening 0, no nesterov): the first step sets the buffer to g, as PyTorch does."""
    (buf,) = state
    if opt.weight_decay:
        g = g + opt.weight_decay * p
    buf = torch.where(step == 0, g, opt.momentum * buf + g)
    return p - lr * buf, [buf]


def adamw_update(opt: OptimizerSpec, p: torch.Tensor, g: torch.Tensor, state: list[torch.Tensor],
                 step: torch.Tensor, lr: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """torch.optim.AdamW (not amsgrad): decoupled decay, bias correction, eps outside the square root."""
    m, v = state
    b1, b2 = opt.betas
    t = step + 1
    p = p * (1 - lr * opt.weight_decay)
    m = m + (1 - b1) * (g - m)
    v = v * b2 + (1 - b2) * (g * g)
    denom = torch.sqrt(v) / torch.sqrt(1 - torch.pow(b2, t)) + opt.eps
    return p - (lr / (1 - torch.pow(b1, t))) * (m / denom), [m, v]


UPDATES = {"sgd": sgd_update, "adamw": adamw_update}


def optimizer_step(opt: OptimizerSpec, params, grads, state, step, lr) -> tuple[list, list]:
    """Update every trainable; `state` is slot-major (all of slot 0, then all of slot 1), as the graph I/O is."""
    n, new_params, new_state = len(params), [], [None] * len(state)
    for i, (p, g) in enumerate(zip(params, grads)):
        p2, s2 = UPDATES[opt.name](opt, p, g, [state[k * n + i] for k in range(len(opt.slots))], step, lr)
        new_params.append(p2)
        for k, value in enumerate(s2):
            new_state[k * n + i] = value
    return new_params, new_state


class Lifted(nn.Module):
    """An exported program's graph called with its trainables as inputs; frozen tensors become buffers.

    forward(*user_inputs, *trainables[, *state, step, lr]). Without an optimizer it returns the user outputs; with
    one: (loss, *user_outputs, *gradients_to_user_inputs, *new_trainables, *new_state, step + 1).
    """

    def __init__(self, program: torch.export.ExportedProgram, trainables: list[str], opt: OptimizerSpec | None,
                 num_user_inputs: int) -> None:
        super().__init__()
        self.gm = program.graph_module
        self.trainables, self.opt, self.num_user = trainables, opt, num_user_inputs
        self.feed: list[tuple[str, int | str]] = []    # per placeholder: user input j, trainable j, or a buffer
        user = 0
        for i, spec in enumerate(program.graph_signature.input_specs):
            if spec.kind == InputKind.USER_INPUT:
                self.feed.append(("user", user))
                user += 1
            elif spec.target in trainables:
                self.feed.append(("train", trainables.index(spec.target)))
            else:
                value = (program.state_dict[spec.target] if spec.target in program.state_dict
                         else program.constants[spec.target])
                self.register_buffer(f"frozen{i}", value.detach().clone())
                self.feed.append(("frozen", f"frozen{i}"))
        if user != num_user_inputs:
            raise RuntimeError(f"the exported program has {user} user inputs, expected {num_user_inputs}")
        self.out_kinds = [(s.kind, s.target) for s in program.graph_signature.output_specs]

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        user = args[:self.num_user]
        train = args[self.num_user:self.num_user + len(self.trainables)]
        outs = self.gm(*[user[j] if kind == "user" else train[j] if kind == "train" else getattr(self, j)
                         for kind, j in self.feed])
        if self.opt is None:
            return tuple(outs)
        rest = args[self.num_user + len(self.trainables):]
        state, step, lr = rest[:-2], rest[-2], rest[-1]
        loss, user_outs, input_grads, grads = None, [], [], {}
        for (kind, target), value in zip(self.out_kinds, outs):
            if kind == OutputKind.LOSS_OUTPUT:
                loss = value
            elif kind == OutputKind.USER_OUTPUT:
                user_outs.append(value)
            elif kind == OutputKind.GRADIENT_TO_USER_INPUT:
                input_grads.append(value)
            elif kind == OutputKind.GRADIENT_TO_PARAMETER:
                grads[target] = value
            else:
                raise RuntimeError(f"unexpected output kind {kind} in the joint graph")
        new_params, new_state = optimizer_step(self.opt, train, [grads[n] for n in self.trainables], state, step, lr)
        return (loss, *user_outs, *input_grads, *new_params, *new_state, step + 1)


class PromptUpdate(nn.Module):
    """No head blocks: the server sends dL/dprompts [P, D] already summed, so the graph is the update alone."""

    def __init__(self, opt: OptimizerSpec) -> None:
        super().__init__()
        self.opt = opt

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        prompt_grad, prompts, rest = args[0], args[1], args[2:]
        state, step, lr = rest[:-2], rest[-2], rest[-1]
        new_params, new_state = optimizer_step(self.opt, [prompts], [prompt_grad], state, step, lr)
        return (*new_params, *new_state, step + 1)


# ------------------------------------------------------------------------------------------ building
def prepare_for_export(model: SplitViT) -> SplitViT:
    """A frozen eval-mode copy with timm's fused attention off (its ONNX form cannot be differentiated)."""
    model = copy.deepcopy(model).eval()
    timm.layers.set_fused_attn(False)
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def image_shape(model: SplitViT) -> tuple[int, int, int]:
    """(channels, height, width) the model's patch embedding takes."""
    embed = model.head.embedding.patch_embed
    return embed.proj.in_channels, *embed.img_size


def _export(module: nn.Module, args: list[torch.Tensor], batch_dims: list[bool], path: Path,
            input_names: list[str], output_names: list[str], varargs: bool = True) -> None:
    """`varargs`: the module's forward takes *args (Lifted and PromptUpdate), so the shapes are one tuple."""
    batch = Dim("batch", min=1, max=MAX_BATCH)
    dynamic = tuple({0: batch} if b else None for b in batch_dims)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "axis name batch will not be used" and similar notes
        program = torch.onnx.export(module.eval(), tuple(args), dynamo=True,
                                    dynamic_shapes=(dynamic,) if varargs else dynamic,
                                    input_names=input_names, output_names=output_names, optimize=False,
                                    opset_version=OPSET, verbose=False)
    program.save(str(path))


def _program(module: nn.Module, args: tuple[torch.Tensor, ...], joint: bool) -> torch.export.ExportedProgram:
    batch = Dim("batch", min=1, max=MAX_BATCH)
    program = torch.export.export(module, args, dynamic_shapes=tuple({0: batch} for _ in args), strict=False)
    return _export_forward_backward(program, joint_loss_index=0) if joint else program.run_decompositions()


def build_portable_graphs(model: SplitViT, opt: OptimizerSpec, out_dir: str | Path,
                          progress=lambda message: None) -> dict[str, str]:
    """Export the six graphs of the portable backend into `out_dir`; returns role -> file name."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = prepare_for_export(model)
    params = dict(model.named_parameters())
    tail_names = model.trainable_names(("tail",))
    local_names = ["head.prompts"] + tail_names
    channels, height, width = image_shape(model)
    classes = model.tail.head.out_features
    # Every example input is its own tensor: the exporter merges inputs that share a tensor object.
    images = lambda: torch.randn(EXPORT_BATCH, channels, height, width)   # noqa: E731
    labels = lambda: torch.arange(EXPORT_BATCH) % classes                  # noqa: E731
    with torch.no_grad():
        tokens = model.head(images())
        body_out = model.body(tokens)
        features = body_out[:, model.tail.pooled_positions(body_out.shape[1])].clone()
    values = lambda names: [params[n].detach().clone() for n in names]  # noqa: E731
    zeros = lambda names: [torch.zeros_like(params[n]) for _ in opt.slots for n in names]  # noqa: E731
    scalars = lambda: [torch.tensor(0.0), torch.tensor(1e-3)]  # noqa: E731
    state_in = lambda names: [state_key(s, n) for s in opt.slots for n in names]  # noqa: E731
    step_io = (["step", "lr"], ["new.step"])

    def trainable_io(names: list[str]) -> tuple[list[str], list[str]]:
        ins = [param_key(n) for n in names] + state_in(names)
        return ins, [NEW + k for k in ins]

    def joint(module: nn.Module, args: tuple[torch.Tensor, ...], trainables: list[str]) -> torch.export.ExportedProgram:
        for n in trainables:
            params[n].requires_grad_(True)
        try:
            return _program(module, args, joint=True)
        finally:
            for n in trainables:
                params[n].requires_grad_(False)

    graphs = {}

    def save(role: str, module: nn.Module, args: list[torch.Tensor], batch_dims: list[bool], ins: list[str],
             outs: list[str]) -> None:
        progress(f"exporting {role}")
        _export(module, args, batch_dims, out_dir / f"{role}.onnx", ins, outs)
        graphs[role] = f"{role}.onnx"

    front = Lifted(_program(Front(model), (images(),), joint=False), ["head.prompts"], None, 1)
    save("front", front, [images()] + values(["head.prompts"]), [True, False], ["images", param_key("head.prompts")],
         ["tokens"])

    tail_logits = Lifted(_program(TailLogits(model), (features.clone(),), joint=False), tail_names, None, 1)
    save("tail_logits", tail_logits, [features.clone()] + values(tail_names), [True] + [False] * len(tail_names),
         ["features"] + [param_key(n) for n in tail_names], ["logits"])

    local_logits = Lifted(_program(LocalLogits(model), (images(),), joint=False), local_names, None, 1)
    save("local_logits", local_logits, [images()] + values(local_names), [True] + [False] * len(local_names),
         ["images"] + [param_key(n) for n in local_names], ["logits"])

    ins, outs = trainable_io(tail_names)
    program = joint(TailLoss(model), (features.clone().requires_grad_(True), labels()), tail_names)
    args = [features.clone(), labels()] + values(tail_names) + zeros(tail_names) + scalars()
    save("tail_step", Lifted(program, tail_names, opt, 2), args, [True, True] + [False] * (len(args) - 2),
         ["features", "labels"] + ins + step_io[0], ["loss", "logits", "dfeatures"] + outs + step_io[1])

    ins, outs = trainable_io(["head.prompts"])
    if model.spec.head_blocks == 0:
        args = [torch.randn(model.spec.prompts, tokens.shape[2])] + values(["head.prompts"]) \
            + zeros(["head.prompts"]) + scalars()
        save("prompt_step", PromptUpdate(opt), args, [False] * len(args), ["prompt_grad"] + ins + step_io[0],
             outs + step_io[1])
    else:
        program = joint(PromptLoss(model), (images(), torch.randn_like(tokens)), ["head.prompts"])
        args = [images(), torch.randn_like(tokens)] + values(["head.prompts"]) + zeros(["head.prompts"]) + scalars()
        save("prompt_step", Lifted(program, ["head.prompts"], opt, 2), args, [True, True] + [False] * (len(args) - 2),
             ["images", "upstream"] + ins + step_io[0], ["dot"] + outs + step_io[1])

    ins, outs = trainable_io(local_names)
    program = joint(LocalLoss(model), (images(), labels()), local_names)
    args = [images(), labels()] + values(local_names) + zeros(local_names) + scalars()
    save("local_step", Lifted(program, local_names, opt, 2), args, [True, True] + [False] * (len(args) - 2),
         ["images", "labels"] + ins + step_io[0], ["loss", "logits"] + outs + step_io[1])
    return graphs


def build_embed_graph(model: SplitViT, out_dir: str | Path, progress=lambda message: None) -> dict[str, str]:
    """Both backends' `embed` graph (images -> embedded tokens, no trainables), for bundles without head
    blocks; {} with head blocks (the tokens the head blocks see carry the prompts)."""
    if model.spec.head_blocks:
        return {}
    model = prepare_for_export(model)
    channels, height, width = image_shape(model)
    progress("exporting the embed graph")
    _export(Embed(model), [torch.randn(EXPORT_BATCH, channels, height, width)], [True],
            Path(out_dir) / f"{EMBED}.onnx", ["images"], ["embedded"], varargs=False)
    return {EMBED: f"{EMBED}.onnx"}


def build_forward_graphs(model: SplitViT, out_dir: str | Path, progress=lambda message: None) -> dict[str, str]:
    """The `training` backend's starting point: plain forward graphs whose weights are initializers named as in
    PyTorch ("head.prompts", "tail.norm.weight", ...), which ONNX Runtime's artifact builder
    (`export/ort_artifacts.py`) turns into training graphs. Returns name -> file: front (images -> tokens),
    tail (features -> logits), local (images -> logits, the local-loss path)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = prepare_for_export(model)
    channels, height, width = image_shape(model)
    images = lambda: torch.randn(EXPORT_BATCH, channels, height, width)   # noqa: E731
    with torch.no_grad():
        body_out = model.body(model.head(images()))
        features = body_out[:, model.tail.pooled_positions(body_out.shape[1])].clone()
    graphs = {}
    for name, module, example, in_name, out_name in (("front", Front(model), images(), "images", "tokens"),
                                                     ("tail", TailLogits(model), features, "features", "logits"),
                                                     ("local", LocalLogits(model), images(), "images", "logits")):
        progress(f"exporting the {name} forward graph")
        _export(module, [example], [True], out_dir / f"{name}.onnx", [in_name], [out_name], varargs=False)
        graphs[name] = f"{name}.onnx"
    return graphs
