"""Per-phase peak memory (log.jsonl, the run summary, the CLI's table), lower sampling peaks, and
out-of-memory errors that name the phase and keep the checkpoint."""
import json
import weakref
from types import SimpleNamespace

import pytest
import torch

from dreambooth.cli.main import main
from dreambooth.errors import OutOfMemory
from dreambooth.training import memory

PHASES = ["class images", "model setup", "latent cache", "text embeddings", "training steps",
          "validation samples", "checkpoint scoring", "save"]


def train_args(subject_dir, run, *extra, steps=2):
    return ["train", "--images", str(subject_dir), "--class-noun", "dog", "--preset", "tiny", "--output", str(run),
            "--steps", str(steps), "--set", "prior.num_images=2", "--set", "output.sample_every=1", *extra]


def test_every_phase_that_ran_logs_its_peak_and_the_cli_prints_the_table(tmp_path, subject_dir, capsys,
                                                                          monkeypatch):
    import dreambooth.training.scoring as scoring

    monkeypatch.setattr(scoring, "build_checkpoint_scorer", lambda *a, **k: object())
    monkeypatch.setattr(scoring, "score_checkpoint", lambda components, config, step, scorer, samples: {
        "step": step, "fidelity": 0.5, "prompt_fidelity": 0.5, "drift": 0.0})
    run = tmp_path / "run"
    assert main(train_args(subject_dir, run, "--eval-every", "1")) == 0
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    phases = [r for r in records if "phase" in r]
    assert sorted({r["phase"] for r in phases}) == sorted(PHASES)
    for r in phases:
        assert "step" not in r  # a phase line never reads as a step (RunDir.started, truncate_log)
        assert all(isinstance(r[k], float) and r[k] >= 0 for k in ("peak_allocated_mb", "peak_reserved_mb",
                                                                   "seconds"))
        # the run's device: CUDA where there is one (train.device=auto)
        expected = memory.CUDA_MEASURE if torch.cuda.is_available() else memory.CPU_MEASURE
        assert r["peak_allocated_mb"] > 0 and r["measure"] == expected
    assert [r["step"] for r in records if "loss" in r] == [1, 2]  # step lines as they were
    summary = json.loads((run / "final" / "dreambooth.json").read_text())["memory"]
    assert list(summary) == list(dict.fromkeys(r["phase"] for r in phases))
    out = capsys.readouterr().out
    table = out[out.index("peak memory by phase"):].splitlines()
    assert [line.split()[0] for line in table[1:]] == [p.split()[0] for p in summary]
    assert all(f"{phase} " in out for phase in PHASES)


class FakeCuda:
    """torch.cuda's peak counters for a device whose memory the test moves by hand."""

    def __init__(self):
        self.allocated = self.peak = 0.0
        self.resets = 0

    def use(self, mb):
        self.allocated += mb
        self.peak = max(self.peak, self.allocated)

    def free(self, mb):
        self.allocated -= mb

    def reset(self, device=None):
        self.resets += 1
        self.peak = self.allocated

    def install(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", self.reset)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: self.peak * memory.MB)
        monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 2 * self.peak * memory.MB)
        props = type("Props", (), {"total_memory": 8000 * memory.MB, "name": "Fake GPU"})
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)


def test_cuda_peaks_are_per_phase_and_an_inner_phase_is_measured_apart(monkeypatch):
    cuda = FakeCuda()
    cuda.install(monkeypatch)
    logged = []
    meter = memory.PhaseMeter(logged.append)
    cuda.use(3000)  # what lives before: the models
    with meter.phase("training steps", "cuda"):
        cuda.use(500)
        cuda.free(500)
        with meter.phase("validation samples", "cuda"):
            cuda.use(1200)
            cuda.free(1200)
        cuda.use(100)
    cuda.free(100)
    with meter.phase("validation samples", "cuda"):
        cuda.use(900)
        cuda.free(900)
    assert [(r["phase"], r["peak_allocated_mb"], r["peak_reserved_mb"]) for r in logged] == [
        ("validation samples", 4200.0, 8400.0), ("training steps", 3500.0, 7000.0),
        ("validation samples", 3900.0, 7800.0)]
    assert all(r["measure"] == memory.CUDA_MEASURE for r in logged) and cuda.resets == 4
    summary = {p.phase: p.peak_allocated_mb for p in meter.summary()}
    assert summary == {"validation samples": 4200.0, "training steps": 3500.0}
    assert "4.10 GiB / 8.20 GiB" in memory.memory_table(meter.summary())


def test_cuda_out_of_memory_names_the_phase_its_peak_and_the_card(monkeypatch):
    cuda = FakeCuda()
    cuda.install(monkeypatch)
    meter = memory.PhaseMeter(advice=lambda phase: [])
    with pytest.raises(OutOfMemory) as caught:
        with meter.phase("class images", "cuda"):
            cuda.use(7000)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.12 GiB. GPU 0 has ...")
    error = caught.value
    assert error.phase == "class images" and error.peak_mb == 7000 and error.total_mb == 8000
    assert "during class images" in error.summary and "6.84 GiB" in error.summary and "7.81 GiB" in error.summary
    assert "tried to allocate 1.12 GiB" in error.summary
    assert error.__cause__ is None and error.__suppress_context__


def oom(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.12 GiB. GPU 0 has a total capacity")


def test_out_of_memory_in_class_images_is_a_clear_error_from_the_cli(tmp_path, subject_dir, capsys, monkeypatch):
    from dreambooth.training import prepare

    monkeypatch.setattr(prepare, "prepare_class_images", oom)
    run = tmp_path / "run"
    assert main(train_args(subject_dir, run, "--set", "prior.cache=" + str(tmp_path / "cache"))) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error: out of memory during class images" in err
    assert "prior.batch_size" in err and "no checkpoint was saved yet" in err
    assert run.is_dir() and (run / "config.yaml").exists()
    last = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
    assert last["phase"] == "class images" and last["out_of_memory"] is True


def test_out_of_memory_in_the_steps_keeps_and_names_the_last_checkpoint(tmp_path, subject_dir, capsys, monkeypatch):
    from dreambooth.training import loop

    def failing_at_step_3(cls):
        class Failing(cls):
            def backward(self, step):
                if step == 2:  # 0-based: the third step, after the checkpoint of step 2
                    oom()
                return super().backward(step)
        return Failing

    monkeypatch.setattr(loop, "PlainStep", failing_at_step_3(loop.PlainStep))
    monkeypatch.setattr(loop, "FastStep", failing_at_step_3(loop.FastStep))
    run = tmp_path / "run"
    assert main(train_args(subject_dir, run, "--set", "output.checkpoint_every=2", "--set", "output.sample_every=0",
                           steps=4)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error: out of memory during training steps" in err
    checkpoint = run / "checkpoints" / "step-00002"
    assert f"last checkpoint: {checkpoint}" in err and (checkpoint / "trainable.safetensors").exists()
    assert "train.gradient_checkpointing" in err and "train.mode" in err


@pytest.fixture(scope="module")
def tiny():
    from dreambooth.models import load_components

    return load_components("tiny-random")


def test_vae_slicing_is_on_for_sampling_and_gives_the_same_images(tiny):
    """Not bit for bit on the CPU: decoding one image at a time rounds a few values differently
    (about 1e-5 of the [-1, 1] range here), so a rare pixel moves by one level of 255."""
    import numpy as np

    from dreambooth.sampling import make_pipeline, sample_images

    pipe = make_pipeline(tiny, "ddim")
    assert pipe.vae.use_slicing

    def images():
        return [np.asarray(i) for i in sample_images(pipe, ["a dog"] * 2, [1, 2], steps=2, guidance=7.5,
                                                     resolution=64, batch_size=2)]
    sliced = images()
    pipe.vae.disable_slicing()
    try:
        whole = images()
    finally:
        pipe.vae.enable_slicing()
    for a, b in zip(sliced, whole):
        moved = np.abs(a.astype(int) - b.astype(int))
        assert moved.max() <= 1 and (moved > 0).mean() < 1e-3


def test_vae_tiling_only_at_768_px_and_above(tiny):
    from dreambooth.sampling import vae_tiling

    vae = tiny.vae
    vae.disable_tiling()
    with vae_tiling(vae, 512):
        assert not vae.use_tiling  # below 768 the decode is untouched, so images are as before
    with vae_tiling(vae, 768):
        assert vae.use_tiling
    assert not vae.use_tiling


def test_vae_tiles_are_at_most_512_px_for_a_1024_px_vae():
    """SDXL's VAE would tile only above its own 1024 px; its 1024 px decode is cut into 512 px tiles
    (64 latent pixels), and its own sizes come back afterwards."""
    from diffusers import AutoencoderKL

    from dreambooth.sampling import vae_tiling

    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), norm_num_groups=4, latent_channels=4, sample_size=1024,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    assert (vae.tile_sample_min_size, vae.tile_latent_min_size) == (1024, 128)
    decoded = []
    vae.tiled_decode = lambda z, **kw: decoded.append(z.shape[-1]) or SimpleNamespace(sample=torch.zeros(1, 3, 8, 8))
    with vae_tiling(vae, 1024):
        assert (vae.tile_sample_min_size, vae.tile_latent_min_size) == (512, 64)
        vae.decode(torch.zeros(1, 4, 128, 128))
    assert decoded == [128]  # the 128-latent image went through the tiled decode
    assert (vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size) == (False, 1024, 128)


def test_sampling_in_mixed_precision_keeps_no_cast_copy_of_the_weights():
    """Autocast's cast cache would hold a bf16 copy of every trainable fp32 weight during sampling."""
    from dreambooth.sampling import sampling_precision

    def part(dtype):
        return type("Part", (), {"dtype": dtype})()
    pipe = type("Pipe", (), {"unet": part(torch.float32), "vae": part(torch.bfloat16),
                             "text_encoder": part(torch.bfloat16), "_execution_device": torch.device("cpu")})()
    with sampling_precision(pipe):
        assert torch.is_autocast_enabled("cpu") and not torch.is_autocast_cache_enabled()


def test_the_class_image_pipeline_is_gone_before_the_optimizer_is_made(tmp_path, subject_dir, monkeypatch):
    from dreambooth.config import load_config
    from dreambooth.training import outputs, prepare, train

    pipes, alive = [], []
    real_pipeline, real_optimizer = outputs.make_pipeline, prepare.make_optimizer

    def tracked_pipeline(*args, **kwargs):
        pipe = real_pipeline(*args, **kwargs)
        pipes.append(weakref.ref(pipe))
        return pipe

    def checked_optimizer(*args, **kwargs):
        alive.extend(p() is not None for p in pipes)
        return real_optimizer(*args, **kwargs)
    monkeypatch.setattr(outputs, "make_pipeline", tracked_pipeline)
    monkeypatch.setattr(prepare, "make_optimizer", checked_optimizer)
    config = load_config("tiny", {"data": {"images": str(subject_dir), "class_noun": "dog"}},
                         ["train.steps=1", "prior.num_images=1", f"prior.cache={tmp_path / 'cache'}",
                          "output.sample_images=0"])
    train(config, tmp_path / "run")
    assert pipes and alive == [False]


@pytest.mark.parametrize("fast", ["never", "always"])
def test_optimizer_state_and_gradients_are_released_before_the_final_save(tmp_path, subject_dir, monkeypatch,
                                                                           fast):
    """After the last step the save and the last samples need only the models: AdamW's moments and
    the gradients (a 12 GB SD 1.5 full fine-tune's final save ran out of memory while they lived)
    are dropped first."""
    from dreambooth.config import load_config
    from dreambooth.training import events as ev
    from dreambooth.training import loop, train

    seen = {}
    real = loop.save_final

    def inspect(components, config, run, selection=None):
        seen["grads"] = [n for n, p in components.unet.named_parameters() if p.grad is not None]
        seen["has_trainable"] = any(p.requires_grad for p in components.unet.parameters())
        return real(components, config, run, selection=selection)

    monkeypatch.setattr(loop, "save_final", inspect)
    states = []
    monkeypatch.setattr(loop, "release_memory", lambda device: states.append(device))
    config = load_config("tiny", {"data": {"images": str(subject_dir), "class_noun": "dog"}},
                         ["train.steps=3", "output.checkpoint_every=0", f"train.fast={fast}", "train.device=cpu"])
    assert isinstance(train(config, tmp_path / "run"), ev.Finished)
    assert seen["has_trainable"] and seen["grads"] == []
    assert states  # and the allocator was asked to hand the memory back
