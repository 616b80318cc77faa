import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402

from export.backbone import save_checkpoint  # noqa: E402

torch.set_num_threads(1)  # tiny models: threads cost more than they give, and the suite stays predictable

TINY = {"img_size": 16, "patch_size": 4, "in_chans": 3, "embed_dim": 32, "depth": 4, "num_heads": 2}


def tiny_vit(num_classes: int = 5, **overrides) -> torch.nn.Module:
    """A ViT small enough for unit tests; any timm ViT keyword can be overridden."""
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes,
                             **{**TINY, **overrides}).eval()


@pytest.fixture
def digits_checkpoint(tmp_path):
    """A tiny ViT for 8x8 grayscale digits, saved the way sfp-pretrain saves one."""
    kwargs = {"img_size": 8, "patch_size": 4, "in_chans": 1, "embed_dim": 32, "depth": 3, "num_heads": 2}
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **kwargs)
    cfg = {"input_size": [1, 8, 8], "mean": [0.3], "std": [0.35], "interpolation": "bilinear", "num_classes": 10}
    return str(save_checkpoint(model, tmp_path / "tiny.pth", "vit_tiny_patch16_224", kwargs, cfg))
