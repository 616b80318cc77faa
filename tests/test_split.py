"""The split is the original model when there are no prompts, and trains only what SFPrompt trains."""
import pytest
import torch

from conftest import tiny_vit
from export.split import SplitViT
from sfp_common.split_spec import SplitSpec
from sfp_common.errors import ConfigError

CONFIGS = [
    ({}, (0, 0)), ({}, (1, 0)), ({}, (0, 1)), ({}, (1, 1)), ({}, (2, 2)), ({}, (4, 0)), ({}, (0, 4)),
    ({"global_pool": "avg"}, (0, 0)), ({"global_pool": "avg"}, (1, 1)),
    ({"global_pool": "avg", "class_token": False}, (1, 0)),
    ({"reg_tokens": 2}, (0, 1)), ({"no_embed_class": True}, (1, 1)),
    ({"img_size": 24, "patch_size": 8}, (0, 0)), ({"img_size": 20, "patch_size": 5, "depth": 3}, (1, 2)),
]


@pytest.mark.parametrize("overrides,cut", CONFIGS)
def test_no_prompts_is_the_original_model(overrides, cut):
    vit = tiny_vit(**overrides)
    size = vit.patch_embed.img_size
    x = torch.randn(3, 3, *size)
    with torch.no_grad():
        expected = vit(x)
        got = SplitViT(vit, SplitSpec(0, *cut))(x)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_prompts_sit_after_prefix_tokens_without_position_embedding():
    vit = tiny_vit(reg_tokens=2)
    split = SplitViT(vit, SplitSpec(prompts=3))
    x = torch.randn(2, 3, 16, 16)
    tokens = split.head(x)
    embedded = split.head.embed(x)
    assert tokens.shape == (2, 3 + 3 + 16, 32)   # cls + 2 registers, 3 prompts, 16 patches
    torch.testing.assert_close(tokens[:, :3], embedded[:, :3])
    torch.testing.assert_close(tokens[:, 3:6], split.head.prompts.expand(2, -1, -1))
    torch.testing.assert_close(tokens[:, 6:], embedded[:, 3:])


def test_avg_pooling_ignores_prompts():
    vit = tiny_vit(global_pool="avg")
    split = SplitViT(vit, SplitSpec(prompts=4, tail_blocks=0))
    tokens = torch.randn(2, 1 + 4 + 16, 32)
    expected = vit.head(vit.fc_norm(vit.norm(tokens)[:, 5:].mean(1)))
    torch.testing.assert_close(split.tail(tokens), expected)


def test_local_path_pools_the_mean_of_head_tokens():
    vit = tiny_vit()
    split = SplitViT(vit, SplitSpec(prompts=2, head_blocks=1, tail_blocks=1))
    x = torch.randn(2, 3, 16, 16)
    mean = split.head(x).mean(1, keepdim=True)
    expected = vit.head(vit.norm(vit.blocks[-1](mean))[:, 0])
    torch.testing.assert_close(split.forward_local(x), expected)


def test_prompt_gradient_is_zero_through_cls_but_not_through_local_mean():
    """Why the local path pools: with k = 0 the cls token never sees the prompts without the body."""
    split = SplitViT(tiny_vit(), SplitSpec(prompts=2))
    split.set_trainable(("prompts", "tail"))
    x = torch.randn(2, 3, 16, 16)
    split.tail(split.head(x)).sum().backward()
    assert split.head.prompts.grad is None or torch.count_nonzero(split.head.prompts.grad) == 0
    split.head.prompts.grad = None
    split.forward_local(x).sum().backward()
    assert torch.count_nonzero(split.head.prompts.grad) > 0


def test_only_prompts_and_tail_train():
    vit = tiny_vit()
    split = SplitViT(vit, SplitSpec(prompts=2, head_blocks=1, tail_blocks=1))
    names = split.set_trainable(("prompts", "tail"))
    assert "head.prompts" in names
    assert all(n == "head.prompts" or n.startswith("tail.") for n in names)
    expected_tail = {id(p) for p in list(vit.blocks[-1].parameters()) + list(vit.norm.parameters())
                     + list(vit.head.parameters())}
    trainable = {id(p) for p in split.parameters() if p.requires_grad}
    assert trainable == expected_tail | {id(split.head.prompts)}
    frozen_ids = {id(p) for p in vit.parameters()} - expected_tail
    assert frozen_ids and all(not p.requires_grad for p in vit.parameters() if id(p) in frozen_ids)
    # every parameter of the original model is in exactly one piece
    assert {id(p) for p in split.parameters()} == {id(p) for p in vit.parameters()} | {id(split.head.prompts)}


def test_split_shares_parameters_without_copying():
    vit = tiny_vit()
    split = SplitViT(vit, SplitSpec(prompts=1, head_blocks=1, tail_blocks=1))
    assert split.head.blocks[0] is vit.blocks[0]
    assert split.body.blocks[0] is vit.blocks[1]
    assert split.tail.blocks[0] is vit.blocks[-1]
    assert len(split.body.blocks) == 2


def test_tail_reads_only_cls_when_it_has_no_blocks():
    split = SplitViT(tiny_vit(), SplitSpec(prompts=2))
    assert split.tail.pooled_positions(19) == slice(0, 1)
    assert SplitViT(tiny_vit(), SplitSpec(2, 0, 1)).tail.pooled_positions(19) == slice(0, 19)
    assert SplitViT(tiny_vit(global_pool="avg"), SplitSpec(2)).tail.pooled_positions(19) == slice(0, 19)


@pytest.mark.parametrize("spec", [SplitSpec(-1), SplitSpec(1, 3, 2), SplitSpec(1, 0, -1)])
def test_impossible_cuts_are_refused(spec):
    with pytest.raises(ConfigError):
        SplitViT(tiny_vit(), spec)


def test_non_vit_and_attention_pooling_are_refused():
    with pytest.raises(ConfigError, match="not a timm VisionTransformer"):
        SplitViT(torch.nn.Linear(2, 2), SplitSpec())
    with pytest.raises(ConfigError, match="attention pooling"):
        SplitViT(tiny_vit(global_pool="map"), SplitSpec())
