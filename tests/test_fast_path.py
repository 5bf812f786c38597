"""The fast training step computes what the plain step computes (DESIGN.md, equivalence tests).

On a CPU in fp32 the two paths must agree bit for bit: same draws, same latents, same loss, same
weights after several optimizer steps. Run with
`HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/test_fast_path.py -q`.
On a GPU, benchmarks/gpu_vs_reference.py compares the bf16 loss curves of both paths.
"""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from dreambooth.config import load_config
from dreambooth.training import events as ev
from dreambooth.training import train


@pytest.fixture(scope="module", autouse=True)
def offline_cache(tmp_path_factory):
    """Keep built-in models and class images out of the user's cache."""
    old = os.environ.get("DREAMBOOTH_CACHE")
    os.environ["DREAMBOOTH_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("DREAMBOOTH_CACHE")
    else:
        os.environ["DREAMBOOTH_CACHE"] = old


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from dreambooth.toyworld import render_subject

    folder = tmp_path_factory.mktemp("subject")
    for i, context in enumerate(["plain", "table", "city"]):
        render_subject("dog", context, seed=i).save(folder / f"dog{i}.png")
    return folder


def run(tmp_path, photos, name, fast, preset, extra):
    config = load_config(preset, {"data": {"images": str(photos), "class_noun": "dog"}},
                         ["train.steps=5", "output.checkpoint_every=0", f"train.fast={fast}", *extra])
    events = []
    last = train(config, tmp_path / name, on_event=events.append)
    assert isinstance(last, ev.Finished)
    losses = [json.loads(line)["loss"] for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
    return losses, events


def weights(folder, lora):
    if lora:
        return load_file(folder / "final" / "pytorch_lora_weights.safetensors")
    out = load_file(folder / "final" / "unet" / "diffusion_pytorch_model.safetensors")
    out.update({f"te.{k}": v for k, v in load_file(folder / "final" / "text_encoder" / "model.safetensors").items()})
    return out


@pytest.mark.parametrize("preset,extra", [("tiny", []), ("tiny", ["train.train_text_encoder=true"]),
                                          ("tiny-lora", ["train.batch_size=2"]),
                                          ("tiny", ["prior.enabled=false", "train.lr_schedule=cosine"])])
def test_fast_step_equals_plain_step_on_cpu(tmp_path, photos, preset, extra):
    plain_losses, plain_events = run(tmp_path, photos, "plain", "never", preset, extra)
    fast_losses, fast_events = run(tmp_path, photos, "fast", "always", preset, extra)
    assert not any(isinstance(e, ev.Notice) and "fast" in e.message for e in fast_events)
    assert plain_losses == fast_losses
    a = weights(tmp_path / "plain", "lora" in preset)
    b = weights(tmp_path / "fast", "lora" in preset)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_fast_step_falls_back_with_a_notice(tmp_path, photos):
    _, events = run(tmp_path, photos, "accum", "always", "tiny", ["train.grad_accum=2"])
    notices = [e.message for e in events if isinstance(e, ev.Notice)]
    assert any("grad_accum" in n for n in notices)
