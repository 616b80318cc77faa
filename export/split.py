"""The SFPrompt split of a timm Vision Transformer: head (+ prompts), body, tail.

One file, read top to bottom: `SplitSpec` (sfp_common/split_spec.py, torch-free) says where to cut, `Head`, `Body` and `Tail` are the three pieces, and
`SplitViT` holds them together with the two forward paths the method needs:

- the split path, head -> body -> tail, which is exactly the original model when there are no prompts;
- the local path, head -> tail with the body skipped, on which the paper's reading of phase 1 scores EL2N and
  runs its local-loss update (the `sfprompt-paper-phase1` ablation; the default recipe uses the split path's own
  logits and cached body features instead, sfp_common/recipe.py). With no head blocks the cls token never sees
  the image on that path, so it pools the mean of all head output tokens (cls, registers, prompts, patches) into
  one token before the tail (`LOCAL_POOL`, see METHOD.md).

Prompts are VPT-shallow: P learnable tokens inserted after the cls/register tokens, after position embedding, so
they carry no position embedding. They count as prefix tokens, so average pooling over patches ignores them.
"""
from __future__ import annotations

import torch
from torch import nn
from timm.models.vision_transformer import VisionTransformer, global_pool_nlc

from sfp_common.errors import ConfigError
from sfp_common.split_spec import SplitSpec

LOCAL_POOL = "mean-of-head-tokens"


class _Embedding(nn.Module):
    """The ViT's own embedding parts under the attribute names `VisionTransformer._pos_embed` reads.

    Calling timm's method on this module (instead of re-writing it) keeps cls/register tokens, `no_embed_class`
    and dynamic image sizes exactly as the model defines them.
    """

    def __init__(self, vit: VisionTransformer) -> None:
        super().__init__()
        self.patch_embed = vit.patch_embed
        self.cls_token = vit.cls_token
        self.reg_token = vit.reg_token
        self.pos_embed = vit.pos_embed
        self.pos_drop = vit.pos_drop
        self.patch_drop = vit.patch_drop
        self.norm_pre = vit.norm_pre
        self.no_embed_class = vit.no_embed_class
        self.dynamic_img_size = vit.dynamic_img_size
        self.num_prefix_tokens = vit.num_prefix_tokens

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)
        x = VisionTransformer._pos_embed(self, x)
        x = self.patch_drop(x)
        return self.norm_pre(x)


class Head(nn.Module):
    """Client front: embedding, prompts, the first `head_blocks` blocks. Output: the smashed tokens."""

    def __init__(self, vit: VisionTransformer, spec: SplitSpec) -> None:
        super().__init__()
        self.embedding = _Embedding(vit)
        self.num_prefix_tokens = vit.num_prefix_tokens  # cls + registers, before the prompts
        self.prompts = nn.Parameter(torch.zeros(spec.prompts, vit.embed_dim))
        if spec.prompts:
            # VPT's initialisation: uniform with the Xavier bound of a patch-sized fan-in.
            patch = vit.patch_embed.patch_size
            fan_in = vit.patch_embed.proj.in_channels * patch[0] * patch[1]
            bound = (6.0 / (fan_in + vit.embed_dim)) ** 0.5
            nn.init.uniform_(self.prompts, -bound, bound)
        self.blocks = nn.Sequential(*vit.blocks[: spec.head_blocks])

    @property
    def first_patch(self) -> int:
        """Where the patch tokens start among the smashed tokens: after cls/registers and the prompts."""
        return self.num_prefix_tokens + len(self.prompts)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen patch + position embedding; a device may compute it once per image and reuse it."""
        return self.embedding(images)

    def attach_prompts(self, embedded: torch.Tensor) -> torch.Tensor:
        prompts = self.prompts.unsqueeze(0).expand(embedded.shape[0], -1, -1)
        n = self.num_prefix_tokens
        return torch.cat([embedded[:, :n], prompts, embedded[:, n:]], dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.attach_prompts(self.embed(images)))


class Body(nn.Module):
    """Server middle: the frozen blocks between head and tail."""

    def __init__(self, vit: VisionTransformer, spec: SplitSpec) -> None:
        super().__init__()
        depth = len(vit.blocks)
        self.blocks = nn.Sequential(*vit.blocks[spec.head_blocks: depth - spec.tail_blocks])

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.blocks(tokens)


class Tail(nn.Module):
    """Client back: the last `tail_blocks` blocks, final norm, pooling and classifier."""

    def __init__(self, vit: VisionTransformer, spec: SplitSpec) -> None:
        super().__init__()
        if vit.attn_pool is not None:
            raise ConfigError("models with attention pooling (global_pool='map') are not supported; "
                              "use a ViT with 'token' or 'avg' pooling")
        self.blocks = nn.Sequential(*vit.blocks[len(vit.blocks) - spec.tail_blocks:])
        self.norm = vit.norm
        self.fc_norm = vit.fc_norm
        self.head_drop = vit.head_drop
        self.head = vit.head
        self.global_pool = vit.global_pool
        self.pool_include_prefix = vit.pool_include_prefix
        self.num_prefix_tokens = vit.num_prefix_tokens + spec.prompts

    def pooled_positions(self, num_tokens: int) -> slice:
        """Which of the body's output tokens this tail reads: with no tail blocks and cls pooling, only the cls."""
        if len(self.blocks) == 0 and self.global_pool == "token":
            return slice(0, 1)
        return slice(0, num_tokens)

    def forward(self, tokens: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        x = self.norm(self.blocks(tokens))
        x = global_pool_nlc(x, pool_type=pool_type or self.global_pool, num_prefix_tokens=self.num_prefix_tokens,
                            reduce_include_prefix=self.pool_include_prefix)
        return self.head(self.head_drop(self.fc_norm(x)))


class SplitViT(nn.Module):
    """A timm ViT cut into head, body and tail; shares its parameters with the model it was cut from."""

    def __init__(self, vit: nn.Module, spec: SplitSpec) -> None:
        super().__init__()
        if not isinstance(vit, VisionTransformer):
            raise ConfigError(f"{type(vit).__name__} is not a timm VisionTransformer; only ViTs can be split")
        spec.check(len(vit.blocks))
        self.spec = spec
        self.__dict__["source"] = vit       # not a submodule (its parameters are the pieces'): for `recut`
        self.head = Head(vit, spec)
        self.body = Body(vit, spec)
        self.tail = Tail(vit, spec)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The split path, run in one place: what the federation computes across client and server."""
        return self.tail(self.body(self.head(images)))

    def forward_local(self, images: torch.Tensor) -> torch.Tensor:
        """The local path (body skipped), pooling as `LOCAL_POOL` says."""
        return self.tail_local(self.head(images))

    def tail_local(self, head_tokens: torch.Tensor) -> torch.Tensor:
        return self.tail(head_tokens.mean(dim=1, keepdim=True), pool_type="token")

    def recut(self, head_blocks: int) -> SplitViT:
        """The same model cut after another number of head blocks: every parameter shared, the prompts too, so
        devices cut differently train the same tensors."""
        if head_blocks == self.spec.head_blocks:
            return self
        with torch.random.fork_rng():                 # the new Head's prompt initialisation draws nothing
            view = SplitViT(self.source, SplitSpec(self.spec.prompts, head_blocks, self.spec.tail_blocks))
        view.head.prompts = self.head.prompts
        return view

    def trainable_names(self, parts: tuple[str, ...]) -> list[str]:
        """Parameter names of the named parts: any of 'prompts', 'head', 'body', 'tail', 'classifier'."""
        prefixes = {"prompts": ("head.prompts",), "head": ("head.",), "body": ("body.",), "tail": ("tail.",),
                    "classifier": ("tail.head.",)}
        wanted = tuple(p for part in parts for p in prefixes[part])
        return [name for name, _ in self.named_parameters() if name.startswith(wanted)]

    def set_trainable(self, parts: tuple[str, ...]) -> list[str]:
        """Freeze everything except the named parts; return the names that train."""
        names = set(self.trainable_names(parts))
        for name, param in self.named_parameters():
            param.requires_grad_(name in names)
        return sorted(names)
