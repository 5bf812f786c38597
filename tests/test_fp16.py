"""fp16 training with dynamic loss scaling, on the CPU (DREAMBOOTH_CPU_FP16=1) with the tiny model."""
import json
import math
import threading

import pytest
import torch
from safetensors.torch import load_file

from dreambooth.config import load_config
from dreambooth.errors import TrainingDiverged
from dreambooth.training import events as ev
from dreambooth.training import scaling, train
from dreambooth.training.checkpoints import resume_checkpoint, save_checkpoint
from dreambooth.training.scaling import LossScaler, Scaling, divergence


@pytest.fixture(autouse=True)
def cpu_fp16(monkeypatch):
    monkeypatch.setenv("DREAMBOOTH_CPU_FP16", "1")


def config_for(subject_dir, *extra, steps=5, device="cpu"):
    """The CPU unless asked: the exact comparisons below hold for one device's kernels."""
    return load_config("tiny", {"data": {"images": str(subject_dir), "class_noun": "dog"}},
                       [f"train.steps={steps}", "output.checkpoint_every=0", "output.sample_images=0",
                        f"train.device={device}", *extra])


def log_of(run):
    """The step lines of the run's log (phase lines carry memory peaks, not steps)."""
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [r for r in lines if "step" in r]


def unet(run):
    return load_file(run / "final" / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="fp16 on a CUDA card"))])
def test_fp16_loss_curve_tracks_fp32(tmp_path, subject_dir, monkeypatch, device):
    """fp16 autocast rounds activations to a 10-bit mantissa (relative error ~5e-4 per op, a few
    1e-3 through the tiny UNet), and AdamW moves each weight by about lr whatever its gradient's
    size, so gradients that round to the other sign move weights apart by lr: step 1 agrees to
    1e-4, step 5 to 1.2% (measured). 3% of the fp32 loss leaves room for that on other CPUs. A
    small initial scale keeps every step applied, so only rounding separates the curves; skipping
    and scaling are checked exactly below. The tiny random model's gradients are large: at 1024 it
    overflowed within 6 steps on two CPUs and on an H200, so 16 leaves a 64x margin."""
    monkeypatch.setattr(scaling, "INIT_SCALE", 16.0)
    for name, precision in (("fp32", "'no'"), ("fp16", "fp16")):
        config = config_for(subject_dir, f"train.mixed_precision={precision}", device=device)
        assert isinstance(train(config, tmp_path / name), ev.Finished)
    full, half = log_of(tmp_path / "fp32"), log_of(tmp_path / "fp16")
    assert [r["step"] for r in half] == [1, 2, 3, 4, 5]
    assert all(r["loss_scale"] == 16.0 and not r["skipped"] for r in half), half
    assert [r["loss"] for r in full] != [r["loss"] for r in half]  # fp16 really ran
    for a, b in zip(full, half):
        assert abs(a["loss"] - b["loss"]) <= 0.03 * a["loss"], (a, b)


def test_overflow_skips_are_logged_and_do_not_stop_the_run(tmp_path, subject_dir, monkeypatch, poison_loss):
    """Steps 2 and 3 overflow (an infinite loss, so infinite gradients): both are skipped and logged,
    the scale halves at each, and the run goes on. Forced rather than left to a large initial scale:
    where fp16 gradients first overflow depends on the CPU's kernels (2^20 still overflowed at step
    12 on one host, and settled by step 8 on another)."""
    monkeypatch.setattr(scaling, "INIT_SCALE", 16.0)  # 64x below where the tiny model first overflowed
    poison_loss(on_parts=lambda n, parts: parts._replace(total=parts.total * float("inf")) if n in (2, 3) else parts)
    last = train(config_for(subject_dir, "train.mixed_precision=fp16", steps=6), tmp_path / "run")
    assert isinstance(last, ev.Finished)
    log = log_of(tmp_path / "run")
    assert [r["step"] for r in log if r["skipped"]] == [2, 3], log
    assert [r["loss_scale"] for r in log] == [16.0, 16.0, 8.0, 4.0, 4.0, 4.0]  # halved at each skip
    assert [r["skipped_steps"] for r in log if r["skipped"]] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in log if not r["skipped"])


def test_fast_step_equals_plain_step_in_fp16_on_cpu(tmp_path, subject_dir, monkeypatch):
    """Same draws, same autocast ops, same unscaling and clipping with AdamW: bit for bit, also
    through the overflow skips a large initial scale forces."""
    monkeypatch.setattr(scaling, "INIT_SCALE", 2.0**20)
    for fast in ("never", "always"):
        last = train(config_for(subject_dir, "train.mixed_precision=fp16", f"train.fast={fast}", steps=10),
                     tmp_path / fast)
        assert isinstance(last, ev.Finished)
    plain, fast = log_of(tmp_path / "never"), log_of(tmp_path / "always")
    assert any(r["skipped"] for r in plain)
    keys = ("loss", "instance_loss", "prior_loss", "loss_scale", "skipped")
    assert [[r[k] for k in keys] for r in plain] == [[r[k] for k in keys] for r in fast]
    a, b = unet(tmp_path / "never"), unet(tmp_path / "always")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resumed_fp16_run_equals_uninterrupted_one(tmp_path, subject_dir, monkeypatch):
    """The large initial scale makes the first steps skip, so a resume that lost the scaler's
    state would skip them again and end elsewhere."""
    monkeypatch.setattr(scaling, "INIT_SCALE", 2.0**20)
    config = config_for(subject_dir, "train.mixed_precision=fp16", steps=10)
    assert isinstance(train(config, tmp_path / "straight"), ev.Finished)
    flag = threading.Event()
    stopped = train(config, tmp_path / "resumed", stop=flag,
                    on_event=lambda e: isinstance(e, ev.StepDone) and e.step == 4 and flag.set())
    assert isinstance(stopped, ev.Stopped) and stopped.step == 4
    assert isinstance(train(config, tmp_path / "resumed", resume=True), ev.Finished)
    straight, resumed = log_of(tmp_path / "straight"), log_of(tmp_path / "resumed")
    assert any(r["skipped"] for r in straight[:4])
    assert [(r["loss"], r["loss_scale"]) for r in straight] == [(r["loss"], r["loss_scale"]) for r in resumed]
    a, b = unet(tmp_path / "straight"), unet(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_scaler_state_round_trips_and_an_old_checkpoint_resumes_with_a_fresh_one(tmp_path):
    model = {"unet": torch.nn.Linear(4, 4)}
    optimizer = torch.optim.AdamW(model["unet"].parameters())
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    saved = LossScaler(torch.device("cpu"), init_scale=1024.0)
    saved.found_inf.fill_(1.0)
    saved.finish()  # an overflow: 512
    path = save_checkpoint(tmp_path, 3, model, optimizer, schedule, keep=2, scaler=saved)
    restored = LossScaler(torch.device("cpu"))
    tensor = restored.scale_tensor
    assert resume_checkpoint(tmp_path, model, optimizer, schedule, restored) == (3, [])
    assert restored.state_dict() == saved.state_dict() and restored.scale_tensor.item() == 512.0
    assert restored.scale_tensor is tensor  # filled in place: a captured CUDA graph keeps reading it
    (path / "scaler.pt").unlink()  # as written before the scaler was saved
    fresh = LossScaler(torch.device("cpu"))
    step, notes = resume_checkpoint(tmp_path, model, optimizer, schedule, fresh)
    assert step == 3 and fresh.scale_tensor.item() == scaling.INIT_SCALE
    assert len(notes) == 1 and "no loss-scaler state" in notes[0] and "fresh" in notes[0]


def test_divergence_rule_under_fp16():
    nan = float("nan")
    assert divergence(nan, None) == "the loss became nan"
    assert divergence(0.3, None) is None
    assert divergence(nan, Scaling(skipped=True, loss_scale=1024.0)) is None  # an overflow, weights untouched
    assert "overflowing" in divergence(nan, Scaling(skipped=True, loss_scale=0.5))
    assert divergence(nan, Scaling(skipped=False, loss_scale=1024.0)) == "the loss became nan"


def test_fp16_whose_overflows_no_scale_explains_stops_the_run(tmp_path, subject_dir, monkeypatch):
    monkeypatch.setattr(scaling, "INIT_SCALE", 4.0)  # a NaN loss every step: 3 skips take it below 1
    monkeypatch.setattr(torch.nn.functional, "mse_loss", lambda a, b, reduction="mean": (a - b) * float("nan"))
    with pytest.raises(TrainingDiverged, match="overflowing"):
        train(config_for(subject_dir, "train.mixed_precision=fp16", steps=6), tmp_path / "run")
    log = log_of(tmp_path / "run")
    assert [r["loss_scale"] for r in log] == [4.0, 2.0, 1.0]
