"""Resume reproduces the uninterrupted run bit for bit; stops and divergence keep a good checkpoint."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from dreambooth.config import load_config
from dreambooth.errors import TrainingDiverged
from dreambooth.training import events as ev
from dreambooth.training import train


def config_for(subject_dir, preset="tiny", *extra):
    return load_config(preset, {"data": {"images": str(subject_dir), "class_noun": "dog"}},
                       ["train.steps=4", "output.checkpoint_every=0", *extra])


def final_weights(run, mode):
    if mode == "lora":
        return load_file(run / "final" / "pytorch_lora_weights.safetensors")
    return {**load_file(run / "final" / "unet" / "diffusion_pytorch_model.safetensors"),
            **{f"te.{k}": v for k, v in load_file(run / "final" / "text_encoder" / "model.safetensors").items()}}


def stop_at(step):
    flag = threading.Event()

    def on_event(event):
        if isinstance(event, ev.StepDone) and event.step == step:
            flag.set()
    return flag, on_event


@pytest.mark.parametrize("preset,extra", [("tiny", ["train.train_text_encoder=true"]),
                                          ("tiny-lora", ["train.train_text_encoder=true"]),
                                          # the weight average (saved in each checkpoint) and the loss options
                                          ("tiny-lora", ["train.train_text_encoder=true", "train.ema_decay=0.5",
                                                         "train.min_snr_gamma=5", "train.offset_noise=0.1"]),
                                          ("tiny", ["data.crop=random", "train.grad_accum=2",
                                                    "train.lr_schedule=cosine", "train.warmup_steps=1"]),
                                          # 8-bit states (torchao tensor subclasses) and tensor LRs
                                          ("tiny", ["train.optimizer=adamw8bit_torchao", "train.fast=always",
                                                    "train.train_text_encoder=true", "train.lr_schedule=cosine"]),
                                          # FP8 codes stored as uint8, which torch's loader would cast
                                          ("tiny", ["train.optimizer=adamwfp8", "train.fast=always",
                                                    "train.train_text_encoder=true", "train.lr_schedule=cosine"]),
                                          # bf16 weight copies written by the optimizer, remade on resume
                                          ("tiny", ["train.fast=always", "train.mixed_precision=bf16",
                                                    "train.train_text_encoder=true"])])
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, subject_dir, preset, extra):
    """Bit for bit on the CPU (`train.device=cpu`); CUDA kernels are not promised to repeat exactly."""
    config = config_for(subject_dir, preset, *extra, "train.device=cpu")
    straight = train(config, tmp_path / "straight")
    assert isinstance(straight, ev.Finished)

    flag, on_event = stop_at(2)
    stopped = train(config, tmp_path / "resumed", stop=flag, on_event=on_event)
    assert isinstance(stopped, ev.Stopped) and stopped.step == 2
    assert not (tmp_path / "resumed" / "final").exists()
    resumed = train(config, tmp_path / "resumed", resume=True)
    assert isinstance(resumed, ev.Finished)

    mode = "lora" if "lora" in preset else "full"
    a, b = final_weights(tmp_path / "straight", mode), final_weights(tmp_path / "resumed", mode)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    log = (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()
    assert [r["step"] for r in map(json.loads, log) if "step" in r] == [1, 2, 3, 4]


def test_a_stop_lands_on_the_asked_step_when_losses_are_read_a_step_late(tmp_path, subject_dir, monkeypatch):
    """On CUDA the fast step's losses are read one step late (the host never waits for the step it
    has just queued), so StepDone(2) arrives while step 3 is already queued. A stop asked on seeing
    step 2 must still end at step 2, as on the plain step, and resuming must give the uninterrupted
    run. Here the late readout runs on the CPU (`train.device=cpu`: the weights compare bit for bit)."""
    from dreambooth.training import prepare

    monkeypatch.setattr(prepare, "readout_lag", lambda fast, device: 1 if fast else 0)  # as on a GPU
    config = config_for(subject_dir, "tiny", "train.fast=always", "train.train_text_encoder=true",
                        "train.device=cpu")
    assert isinstance(train(config, tmp_path / "straight"), ev.Finished)
    flag, stop_on = stop_at(2)
    seen = []
    stopped = train(config, tmp_path / "resumed", stop=flag, on_event=lambda e: (seen.append(e), stop_on(e)))
    assert isinstance(stopped, ev.Stopped) and stopped.step == 2
    assert [e.step for e in seen if isinstance(e, ev.StepDone)] == [1, 2]
    assert isinstance(train(config, tmp_path / "resumed", resume=True), ev.Finished)
    a, b = final_weights(tmp_path / "straight", "full"), final_weights(tmp_path / "resumed", "full")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()
    assert [r["step"] for r in map(json.loads, log) if "step" in r] == [1, 2, 3, 4]


def test_resume_across_optimizer_layouts_is_a_clear_error(tmp_path, subject_dir, monkeypatch):
    """8-bit AdamW on the fast step keeps flat-buffer chunks; a plain-step resume has one state per
    tensor (same config, `train.fast=auto`: a GPU run resumed on a CPU). The mismatch must name the
    checkpoint and what to do, not surface torch's ValueError. Both runs are on the CPU
    (`train.device=cpu`), where `auto` gives the plain step even on a GPU machine."""
    from dreambooth.errors import RunDirError
    from dreambooth.training import prepare

    config = config_for(subject_dir, "tiny", "train.optimizer=adamw8bit_torchao", "train.fast=auto",
                        "train.device=cpu")
    real = prepare.use_fast_path
    monkeypatch.setattr(prepare, "use_fast_path", lambda *a: (True, ""))  # as on a GPU
    flag, on_event = stop_at(2)
    stopped = train(config, tmp_path / "run", stop=flag, on_event=on_event)
    assert isinstance(stopped, ev.Stopped)
    monkeypatch.setattr(prepare, "use_fast_path", real)  # auto on the CPU: the plain step
    assert real(config, torch.device("cpu"), 1, "no") == (False, "")
    with pytest.raises(RunDirError, match="different parameter layout") as caught:
        train(config, tmp_path / "run", resume=True)
    assert "train.fast" in str(caught.value.problems[0])


def test_resume_is_refused_when_the_config_changed(tmp_path, subject_dir):
    flag, on_event = stop_at(1)
    train(config_for(subject_dir), tmp_path / "run", stop=flag, on_event=on_event)
    from dreambooth.errors import ConfigError

    with pytest.raises(ConfigError, match="train.lr"):
        train(config_for(subject_dir, "tiny", "train.lr=0.5"), tmp_path / "run", resume=True)


def test_nan_loss_stops_with_step_and_keeps_checkpoint(tmp_path, subject_dir, step_kind, poison_loss):
    loss_name, settings = step_kind
    calls = poison_loss(on_parts=lambda n, parts: parts._replace(total=parts.total * float("nan")) if n == 3
                        else parts)
    config = config_for(subject_dir, "tiny", "output.checkpoint_every=2", *settings)
    with pytest.raises(TrainingDiverged) as info:
        train(config, tmp_path / "run")
    assert set(calls) == {loss_name} and len(calls) >= 3  # the step meant ran, and its loss was poisoned
    assert "step 3" in str(info.value) and "step-00002" in str(info.value)
    assert (tmp_path / "run" / "checkpoints" / "step-00002" / "state.json").exists()
    assert not (tmp_path / "run" / "final").exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_checkpoint_and_exits_with_128_plus_its_number(tmp_path, subject_dir, signum):
    """Ctrl-C exits 130 and SIGTERM 143, as shells report them, not 0 like a finished run."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "dreambooth", "train", "--images", str(subject_dir), "--class-noun", "dog",
           "--preset", "tiny", "--steps", "100000", "--output", str(run), "--set", "output.checkpoint_every=0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "DREAMBOOTH_NO_PROGRESS": "1"})
    deadline = time.time() + 120
    log = run / "log.jsonl"  # wait for a step line (the phases' memory lines come before it)
    while time.time() < deadline and not (log.exists() and '"step"' in log.read_text()):
        time.sleep(0.2)
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, out
    assert "resume with --resume" in out
    checkpoints = list((run / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "trainable.safetensors").exists()


def test_select_best_puts_the_chosen_step_in_final(tmp_path, subject_dir, monkeypatch):
    import dreambooth.training.scoring as scoring

    scores = {2: 0.9, 4: 0.5}  # step 2 is the better checkpoint
    monkeypatch.setattr(scoring, "build_checkpoint_scorer", lambda *a, **k: object())
    monkeypatch.setattr(scoring, "score_checkpoint", lambda components, config, step, scorer, samples: {
        "step": step, "fidelity": scores[step], "prompt_fidelity": 0.9, "drift": 0.0})
    config = config_for(subject_dir, "tiny", "output.checkpoint_every=2", "eval.every=2", "eval.select=best")
    last = train(config, tmp_path / "run")
    assert isinstance(last, ev.Finished)
    info = json.loads((tmp_path / "run" / "final" / "dreambooth.json").read_text())
    assert info["selected_step"] == 2 and "step 2" in info["selection_reason"]
    chosen = load_file(tmp_path / "run" / "checkpoints" / "step-00002" / "trainable.safetensors")
    final = load_file(tmp_path / "run" / "final" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(final[k[len("unet."):]], v) for k, v in chosen.items() if k.startswith("unet."))
    assert (tmp_path / "run" / "scores.png").exists()
    assert not (tmp_path / "run" / "checkpoints" / "scored").exists()  # snapshots cleaned up
