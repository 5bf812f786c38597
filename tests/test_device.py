"""`train.device` steers every place a run computes: the Accelerator, class images, latents, steps, samples."""
import torch

from dreambooth.config import load_config
from dreambooth.training import events as ev
from dreambooth.training import train


def cuda_accelerator(monkeypatch):
    """An Accelerator on CUDA in this CPU-only torch, as an earlier run in the process would leave it.
    accelerate (1.16 on) asks `torch.accelerator` for the device, which is told "cuda" for this call only:
    torch's optimizers ask it too, and would look for a CUDA stream."""
    from dreambooth.training.prepare import make_accelerator

    with monkeypatch.context() as m:
        m.setattr(torch.accelerator, "current_accelerator", lambda *a, **k: torch.device("cuda"))
        return make_accelerator(torch.device("cuda"), "no")


def test_train_device_cpu_runs_on_the_cpu_where_cuda_is_present_even_after_a_cuda_run(tmp_path, subject_dir,
                                                                                      monkeypatch):
    """CUDA is reported present, and an earlier run in this process left accelerate's process-wide
    state on CUDA. `train.device=cpu` must still put every phase on the CPU: this torch has no CUDA,
    so anything that went to CUDA would raise."""
    from dreambooth.training import prepare

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    assert cuda_accelerator(monkeypatch).device.type == "cuda"  # the earlier run
    class_devices = []
    real_class_images = prepare.prepare_class_images

    def recording(components, config, device, *rest):
        class_devices.append(torch.device(device).type)
        yield from real_class_images(components, config, device, *rest)
    monkeypatch.setattr(prepare, "prepare_class_images", recording)
    config = load_config("tiny", {"data": {"images": str(subject_dir), "class_noun": "dog"}},
                         ["train.steps=2", "output.checkpoint_every=0", "train.device=cpu"])
    events = []
    last = train(config, tmp_path / "run", on_event=events.append)
    assert isinstance(last, ev.Finished)
    [started] = [e for e in events if isinstance(e, ev.Started)]
    assert (started.device, started.mixed_precision) == ("cpu", "no")  # auto precision follows the device
    assert class_devices == ["cpu"]
    assert not any(isinstance(e, ev.Notice) and "fast" in e.message for e in events)  # auto fast: CUDA only
    assert list((tmp_path / "run" / "samples").glob("*.png"))  # validation samples were drawn (on the CPU)


def test_make_accelerator_follows_each_runs_device_and_precision_in_one_process(monkeypatch):
    """accelerate refuses to change its singleton state (`cpu=True` after CUDA, another precision);
    each run still gets the device and precision it asked for."""
    from dreambooth.training.prepare import make_accelerator

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cuda_accelerator(monkeypatch).device.type == "cuda"
    cpu = make_accelerator(torch.device("cpu"), "bf16")
    assert (cpu.device.type, cpu.mixed_precision) == ("cpu", "bf16")
    again = make_accelerator(torch.device("cpu"), "no")
    assert (again.device.type, again.mixed_precision) == ("cpu", "no")
