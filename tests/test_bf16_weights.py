"""train.weights=bf16: full fine-tunes that keep their trained weights in bf16 (SDXL in 24 GB),
with the optimizer's stochastic rounding standing in for fp32 master weights."""
import pytest
import torch
from safetensors.torch import load_file

from dreambooth.config import TrainConfig, load_config
from dreambooth.errors import ConfigError
from dreambooth.models import builtin_path
from dreambooth.training import events as ev
from dreambooth.training import train
from dreambooth.training.setup import make_optimizer


def _drift_after_steps(stochastic: bool, lr: float = 1e-5, steps: int = 20) -> float:
    """Mean weight change of a bf16 layer whose loss pulls every weight down by the same gradient."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(512, 64, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        layer.weight.uniform_(0.04, 0.06)  # bf16 spacing there is 2.4e-4: 24x each update of lr
    start = layer.weight.detach().float().clone()
    optimizer = make_optimizer({"unet": layer}, TrainConfig(lr=lr, weight_decay=0.0, optimizer="adamw8bit_torchao",
                                                            weights="bf16" if stochastic else "fp32"),
                               torch.device("cpu"))
    for _ in range(steps):
        layer.weight.grad = torch.ones_like(layer.weight)
        optimizer.step()
    return float((layer.weight.detach().float() - start).mean())


def test_stochastic_rounding_keeps_updates_far_below_bf16_resolution():
    """Adam moves each weight by about lr per step: 20 steps of 1e-5 should move it by 2e-4. Rounded
    to nearest, every one of those steps rounds back to the same bf16 value; rounded stochastically,
    the mean change is the intended one."""
    assert _drift_after_steps(stochastic=False) == 0.0
    assert _drift_after_steps(stochastic=True) == pytest.approx(-20 * 1e-5, rel=0.25)


def test_a_full_run_trains_bf16_weights(tmp_path, subject_dir):
    config = load_config("tiny", {"data": {"images": str(subject_dir), "class_noun": "dog"}},
                         ["train.steps=3", "train.weights=bf16", "train.optimizer=adamw8bit_torchao",
                          "train.mixed_precision=bf16", "train.device=cpu", "train.lr=1e-3",
                          "output.checkpoint_every=2", "output.sample_images=0"])
    assert isinstance(train(config, tmp_path / "run"), ev.Finished)
    checkpoint = next((tmp_path / "run" / "checkpoints").glob("step-*"))
    weights = load_file(next(checkpoint.rglob("*.safetensors")))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}  # trained and checkpointed in bf16
    base = load_file(builtin_path("tiny-random") / "unet" / "diffusion_pytorch_model.safetensors")
    final = load_file(tmp_path / "run" / "final" / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(final[k].float(), base[k].float()) for k in base)


@pytest.mark.parametrize("overrides,says", [
    (["train.optimizer=adamw"], "adamwfp8_torchao or adamw8bit_torchao"),
    (["train.optimizer=adamw8bit_torchao", "train.mode=lora"], "full fine-tunes"),
    (["train.optimizer=adamw8bit_torchao", "train.mixed_precision=fp16"], "mixed_precision bf16"),
])
def test_bf16_weights_without_what_they_need_are_refused(overrides, says, subject_dir):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", {"data": {"images": str(subject_dir), "class_noun": "dog"}},
                    ["train.weights=bf16", *overrides])
    assert "train.weights" in err.value.report() and says in err.value.report()


def test_bf16_weights_on_a_device_without_bf16_stop_before_anything_runs(tmp_path, subject_dir):
    config = load_config("tiny", {"data": {"images": str(subject_dir), "class_noun": "dog"}},
                         ["train.weights=bf16", "train.optimizer=adamw8bit_torchao", "train.device=cpu"])
    with pytest.raises(ConfigError, match="resolved train.mixed_precision to 'no'"):
        train(config, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())
