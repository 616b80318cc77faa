"""One client's round counted without being computed: the same `client_round`, run on meta tensors.

Meta tensors carry shapes and dtypes but no values, so FlopCounterMode and the wire meter see exactly the ops and
tensors of a real round (ViT-B/16 at 224 in well under a minute) while nothing is computed.
"""
from __future__ import annotations

import numpy as np
import torch

from export.backbone import ModelSource, create_vit
from export.split import SplitViT
from sfp_common.split_spec import SplitSpec
from sfp_common.pruning import SampleMemory
from sfp_common.recipe import Recipe
from simulation.accounting import ClientMeter
from simulation.methods import ClientData, client_round, get_method


def count_client_round(method_name: str, source: ModelSource, num_classes: int, spec: SplitSpec,
                       recipe: Recipe, num_samples: int, seed: int = 0, memory: SampleMemory | None = None,
                       traffic: str = "ours") -> ClientMeter:
    """`memory`: which samples are scored, cached and kept by the server (if the recipe asks it to) before the
    round; None: all of them (a round after the first, what a client does from then on)."""
    method = get_method(method_name)
    if not method.uses_prompts:
        spec = SplitSpec(0, spec.head_blocks, spec.tail_blocks)
    with torch.device("meta"):
        vit = create_vit(source, num_classes=num_classes, pretrained=False)
        model = SplitViT(vit, spec)
    model.set_trainable(method.client_parts + method.server_parts)
    x = torch.empty(num_samples, vit.patch_embed.proj.in_channels, *vit.patch_embed.img_size, device="meta")
    y = torch.empty(num_samples, dtype=torch.long, device="meta")
    data = ClientData(x, y, x[:0], y[:0])
    if memory is None:
        memory = SampleMemory.shaped_like(num_samples, 0, num_samples, num_samples)
    return client_round(model, method, recipe, data, np.random.default_rng(seed), memory, traffic).meter
