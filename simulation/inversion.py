"""What an honest-but-curious server can rebuild of a device's images from the smashed tokens it receives.

The server has everything the protocol gives it: the pretrained weights (the head's patch embedding and blocks
are the public backbone's), the current prompts (it aggregates them), and the tokens in their wire precision.
Three attacks, each returning images in the model's input space (normalised, [B, C, H, W]):

- `analytic_inverse` (no head blocks): the smashed patch tokens are an affine map of the pixels (patch projection
  + bias + position embedding); least squares through the projection recovers each patch.
- `optimised_inverse` (any split): white-box: the image whose head output matches the tokens, by gradient descent
  with a total-variation prior, best of several restarts (He et al., "Model inversion attacks against
  collaborative inference", ACSAC 2019).
- `LearnedInverse`: a decoder the server trains on public images of the same kind passed through the same head
  (e.g. Fashion-MNIST for devices holding MNIST), then applies to the tokens (He et al. 2019's inverse network).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from export.split import SplitViT
from sfp_common.errors import ConfigError
from simulation.accounting import decode, encode


def on_the_wire(tokens: torch.Tensor, wire: str) -> torch.Tensor:
    """The tokens as the server decodes them from the device's wire precision (the reference meter's codec)."""
    return decode(encode(tokens.detach(), wire), wire)


def analytic_inverse(model: SplitViT, tokens: torch.Tensor) -> torch.Tensor:
    """Least squares through the known patch projection, with its bias and the position embedding removed."""
    if model.spec.head_blocks:
        raise ConfigError("the analytic inverse needs a split with no head blocks")
    embedding = model.head.embedding
    if not isinstance(embedding.norm_pre, nn.Identity) or not isinstance(embedding.patch_embed.norm, nn.Identity):
        raise ConfigError("the analytic inverse covers ViTs whose patch tokens are the projection plus position "
                          "embedding (no norm in between); use the optimised inverse")
    proj = embedding.patch_embed.proj                             # Conv2d(C, D, p, stride p)
    c, (ph, pw) = proj.in_channels, proj.kernel_size
    weight = proj.weight.detach().reshape(proj.out_channels, -1)  # [D, C*p*p]
    patches = tokens[:, slice(model.head.first_patch, None)].detach()              # [B, N, D]
    pos = embedding.pos_embed.detach()
    if not embedding.no_embed_class:                              # the pos embedding also covers the prefix tokens
        pos = pos[:, embedding.num_prefix_tokens:]
    target = patches - pos - proj.bias.detach()
    pixels = torch.linalg.lstsq(weight.expand(len(target), -1, -1), target.transpose(1, 2)).solution  # [B, Cpp, N]
    grid_h, grid_w = embedding.patch_embed.grid_size
    pixels = pixels.reshape(len(target), c, ph, pw, grid_h, grid_w)
    return pixels.permute(0, 1, 4, 2, 5, 3).reshape(len(target), c, grid_h * ph, grid_w * pw)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def optimised_inverse(model: SplitViT, tokens: torch.Tensor, shape: tuple[int, int, int], bounds: tuple[float, float],
                      steps: int = 300, restarts: int = 3, tv: float = 0.05, lr: float = 0.1, seed: int = 0,
                      progress: Callable[[str], None] = lambda message: None) -> torch.Tensor:
    """Per image, the best of `restarts` descents from random starts (lowest token-matching loss), kept within the
    input range the preprocessing gives (`bounds`)."""
    generator = torch.Generator().manual_seed(seed)
    target = tokens.detach()
    low, high = bounds
    best, best_loss = None, torch.full((len(target),), float("inf"))
    for restart in range(restarts):
        x = (low + (high - low) * torch.rand(len(target), *shape, generator=generator)).requires_grad_(True)
        opt = torch.optim.Adam([x], lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            error = ((model.head(x) - target) ** 2).mean(dim=(1, 2))
            (error.sum() + tv * len(target) * total_variation(x)).backward()
            opt.step()
            with torch.no_grad():
                x.clamp_(low, high)
        with torch.no_grad():
            final = ((model.head(x) - target) ** 2).mean(dim=(1, 2))
            chosen = final < best_loss
            best = x.detach().clone() if best is None else torch.where(chosen[:, None, None, None], x, best)
            best_loss = torch.minimum(final, best_loss)
        progress(f"restart {restart + 1}/{restarts}: token error {best_loss.mean():.4g}")
    return best


class LearnedInverse(nn.Module):
    """Tokens -> image: each patch token decoded to its patch's pixels by a small MLP (ViT tokens stay local
    enough after a few blocks), then a convolution smooths across patch borders."""

    def __init__(self, model: SplitViT, hidden: int = 256) -> None:
        super().__init__()
        embed = model.head.embedding.patch_embed
        self.c, (self.ph, self.pw) = embed.proj.in_channels, embed.proj.kernel_size
        self.grid = embed.grid_size
        self.patches = slice(model.head.first_patch, None)
        dim = model.head.prompts.shape[1]
        self.decode = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(),
                                    nn.Linear(hidden, self.c * self.ph * self.pw))
        self.refine = nn.Conv2d(self.c, self.c, 3, padding=1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b = len(tokens)
        pixels = self.decode(tokens[:, self.patches])                       # [B, N, C*p*p]
        (gh, gw) = self.grid
        x = pixels.reshape(b, gh, gw, self.c, self.ph, self.pw).permute(0, 3, 1, 4, 2, 5)
        x = x.reshape(b, self.c, gh * self.ph, gw * self.pw)
        return x + self.refine(x)


def train_learned_inverse(model: SplitViT, public: torch.Tensor, wire: str, epochs: int = 5, batch_size: int = 64,
                          lr: float = 2e-3, seed: int = 0,
                          transform: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
                          progress: Callable[[str], None] = lambda message: None) -> LearnedInverse:
    """The server's inverse network, trained on public images through the same head, wire precision and
    defence (`transform`, applied to the tokens as the device would) as the tokens it will attack."""
    torch.manual_seed(seed)
    inverse = LearnedInverse(model)
    opt = torch.optim.Adam(inverse.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        tokens = torch.cat([on_the_wire(transform(model.head(public[i:i + 256])), wire)
                            for i in range(0, len(public), 256)])
    for epoch in range(epochs):
        total = 0.0
        for idx in np.array_split(rng.permutation(len(public)), max(1, len(public) // batch_size)):
            i = torch.from_numpy(idx)
            opt.zero_grad()
            loss = ((inverse(tokens[i]) - public[i]) ** 2).mean()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        progress(f"inverse network epoch {epoch + 1}/{epochs}: mse {total / len(public):.4f}")
    return inverse.eval()
