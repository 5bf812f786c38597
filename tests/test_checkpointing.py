"""Activation checkpointing: which UNet blocks recompute (train.checkpoint_levels), and that
recomputing changes no gradient."""
import pytest
import torch

from dreambooth.models.builtin import tiny_configs
from dreambooth.training.setup import enable_checkpointing


def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**tiny_configs("sd1")["unet"])


def run(unet):
    torch.manual_seed(1)
    x, emb = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    unet.zero_grad(set_to_none=True)
    unet(x, torch.tensor([10, 700]), emb).sample.square().mean().backward()
    return {name: p.grad.clone() for name, p in unet.named_parameters()}


def recomputed_blocks(unet, monkeypatch) -> set[str]:
    """Names of the top-level UNet blocks whose modules went through the checkpoint function."""
    owner = {id(m): name.split(".")[0] + "." + name.split(".")[1]
             for name, m in unet.named_modules() if name.count(".") >= 1 and name.split(".")[0].endswith("blocks")}
    owner.update({id(m): "mid_block" for m in unet.mid_block.modules()})
    seen = set()
    real = torch.utils.checkpoint.checkpoint

    def spy(function, *args, **kwargs):
        seen.add(owner.get(id(function), "?"))
        return real(function, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", spy)
    run(unet)
    return seen


@pytest.mark.parametrize("levels,expected", [
    (1, {"down_blocks.0", "up_blocks.3"}),
    (2, {"down_blocks.0", "down_blocks.1", "up_blocks.2", "up_blocks.3"}),
    (0, {"down_blocks.0", "down_blocks.1", "down_blocks.2", "down_blocks.3", "mid_block",
         "up_blocks.0", "up_blocks.1", "up_blocks.2", "up_blocks.3"}),
    (3, {"down_blocks.0", "down_blocks.1", "down_blocks.2", "up_blocks.1", "up_blocks.2", "up_blocks.3"}),
    (4, {"down_blocks.0", "down_blocks.1", "down_blocks.2", "down_blocks.3", "mid_block",
         "up_blocks.0", "up_blocks.1", "up_blocks.2", "up_blocks.3"}),
    (9, {"down_blocks.0", "down_blocks.1", "down_blocks.2", "down_blocks.3", "mid_block",
         "up_blocks.0", "up_blocks.1", "up_blocks.2", "up_blocks.3"}),
])
def test_checkpoint_levels_recompute_only_the_outer_levels(monkeypatch, levels, expected):
    """Level 1 is the highest resolution: the first down block and the last up block. As many
    levels as the UNet has (4), or more, recompute everything, as 0 does."""
    unet = tiny_unet()
    enable_checkpointing(unet, (), levels)
    assert recomputed_blocks(unet, monkeypatch) == expected


@pytest.mark.parametrize("levels", [0, 1])
def test_checkpointing_leaves_gradients_unchanged(levels):
    plain = run(tiny_unet())
    unet = tiny_unet()
    enable_checkpointing(unet, (), levels)
    recomputed = run(unet)
    assert plain.keys() == recomputed.keys()
    for name in plain:
        assert torch.equal(plain[name], recomputed[name]), name


def test_checkpoint_levels_without_checkpointing_or_negative_is_refused():
    from dreambooth.config import TrainConfig

    assert TrainConfig(gradient_checkpointing=True, checkpoint_levels=1).problems() == []
    problems = TrainConfig(gradient_checkpointing=True, checkpoint_levels=-1).problems()
    assert [p.where for p in problems] == ["train.checkpoint_levels"]
    problems = TrainConfig(checkpoint_levels=1).problems()
    assert [p.where for p in problems] == ["train.checkpoint_levels"]
    assert "gradient_checkpointing" in problems[0].message
