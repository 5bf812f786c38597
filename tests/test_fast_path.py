"""The fast training step computes what the plain step computes.

On a CPU in fp32 the two paths must agree bit for bit: same draws, same latents, same loss, same
weights after several optimizer steps. Run with
`HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/test_fast_path.py -q`.
These tests set `train.device=cpu`; on CUDA (bf16) the two paths agree within the tolerance that
`test_fast_step_trains_like_the_plain_step_on_cuda` states, and benchmarks/gpu_vs_reference.py
compares their bf16 loss curves.
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
    log = [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "step" in r]  # step lines, not the phases' memory lines
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
    extra = [*extra, "train.device=cpu"]  # bit equality holds in fp32 on the CPU only
    plain_losses, plain_events = run(tmp_path, photos, "plain", "never", preset, extra)
    fast_losses, fast_events = run(tmp_path, photos, "fast", "always", preset, extra)
    assert not any(isinstance(e, ev.Notice) and "fast" in e.message for e in fast_events)
    assert plain_losses == fast_losses
    a = weights(tmp_path / "plain", "lora" in preset)
    b = weights(tmp_path / "fast", "lora" in preset)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_fast_step_equals_plain_step_with_the_loss_options_on(tmp_path, photos):
    """Min-SNR weights, offset noise, the weight average and the masked loss (alpha masks), all at
    once: the two steps weigh, draw and average alike, bit for bit on the CPU in fp32."""
    from PIL import Image, ImageDraw

    masked = tmp_path / "masked"
    masked.mkdir()
    for path in sorted(photos.iterdir()):
        photo = Image.open(path).convert("RGBA")
        alpha = Image.new("L", photo.size, 0)
        w, h = photo.size
        ImageDraw.Draw(alpha).ellipse((w // 5, h // 6, w * 3 // 4, h * 5 // 6), fill=255)
        photo.putalpha(alpha)
        photo.save(masked / path.name)
    extra = ["train.device=cpu", "train.batch_size=2", "train.min_snr_gamma=5", "train.offset_noise=0.1",
             "train.ema_decay=0.6", "data.masks=alpha", "train.mask_background_weight=0.2"]
    plain_losses, _ = run(tmp_path, masked, "plain", "never", "tiny", extra)
    fast_losses, fast_events = run(tmp_path, masked, "fast", "always", "tiny", extra)
    assert not any(isinstance(e, ev.Notice) and "fast" in e.message for e in fast_events)
    assert plain_losses == fast_losses
    reference, _ = run(tmp_path, masked, "no-options", "never", "tiny", ["train.device=cpu", "train.batch_size=2"])
    assert all(a != b for a, b in zip(plain_losses, reference))  # the options changed every step's loss
    a, b = weights(tmp_path / "plain", False), weights(tmp_path / "fast", False)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compares the two steps on CUDA")
@pytest.mark.parametrize("extra", [[], ["train.train_text_encoder=true"],
                                   ["prior.enabled=false", "train.lr_schedule=cosine"],
                                   ["train.min_snr_gamma=5", "train.offset_noise=0.1", "train.ema_decay=0.6"]])
def test_fast_step_trains_like_the_plain_step_on_cuda(tmp_path, photos, extra):
    """On CUDA in bf16 (auto) the two steps run different kernels (CUDA graph, channels-last, their
    own autocast), so they agree to rounding, not bit for bit.

    Losses: bf16 keeps 8 significant bits, a relative rounding of 2**-8 = 0.4% per value; the
    H200 showed step-1 losses 0.4% apart (2.1518 vs 2.1429). rtol 2% leaves 5x for the later steps,
    whose weights differ slightly too. A step that computed something else (a wrong target, a
    missing prior half, another timestep) moves the loss by tens of percent.
    Weights: in the first steps AdamW moves every weight by about +-lr whatever its gradient's size,
    so where a gradient is within bf16 rounding of zero the sign of its step differs between the
    two. On the H200 the updates (final minus initial weights) of the two steps had cosines of 0.43
    (text encoder trained) to about 0.78, the mark of sign noise on many small gradients. Single
    weights are not compared: the updates must point the same way, cosine > 0.3 (two unrelated
    updates of this many weights give about 0).
    """
    from dreambooth.models import load_components

    extra = [*extra, "train.device=cuda"]
    plain_losses, _ = run(tmp_path, photos, "plain", "never", "tiny", extra)
    fast_losses, fast_events = run(tmp_path, photos, "fast", "always", "tiny", extra)
    assert not any(isinstance(e, ev.Notice) and "fast" in e.message for e in fast_events)
    torch.testing.assert_close(torch.tensor(fast_losses), torch.tensor(plain_losses), rtol=2e-2, atol=0)
    base = load_components("tiny-random").unet.state_dict()
    a, b = weights(tmp_path / "plain", False), weights(tmp_path / "fast", False)
    plain_update = torch.cat([(a[k].float() - base[k].float()).flatten() for k in base])
    fast_update = torch.cat([(b[k].float() - base[k].float()).flatten() for k in base])
    assert plain_update.norm() > 0
    assert torch.nn.functional.cosine_similarity(fast_update, plain_update, dim=0) > 0.3


def test_fast_step_falls_back_with_a_notice(tmp_path, photos):
    _, events = run(tmp_path, photos, "accum", "always", "tiny", ["train.grad_accum=2"])
    notices = [e.message for e in events if isinstance(e, ev.Notice)]
    assert any("grad_accum" in n for n in notices)


@pytest.mark.parametrize("optimizer", ["fused_adamw", "adamwfp8"])
def test_clipping_folded_into_the_optimizer_matches_clip_then_step(optimizer):
    """The fast step divides gradients by `grad_scale` inside fused AdamW or AdamWFp8 instead of
    clipping first (one pass over the gradients fewer)."""
    from dreambooth.training.adamw_fp8 import AdamWFp8
    from dreambooth.training.fast import grad_scale_for_clipping, takes_grad_scale

    torch.manual_seed(0)
    models = [torch.nn.Linear(256, 64) for _ in range(2)]  # 16384 weights: AdamWFp8 quantizes them
    models[1].load_state_dict(models[0].state_dict())
    make = {"fused_adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
            "adamwfp8": lambda ps: AdamWFp8(ps, lr=1e-2)}[optimizer]
    optimizers = [make(m.parameters()) for m in models]
    assert takes_grad_scale(optimizers[1])
    for step in range(3):
        x = torch.randn(4, 256)
        for m in models:
            (m(x) * (10 + step)).square().sum().backward()  # norms far above max_norm: clipping acts
        torch.nn.utils.clip_grad_norm_(models[0].parameters(), 0.5)
        total = torch.nn.utils.get_total_norm([p.grad for p in models[1].parameters()])
        assert total > 0.5
        optimizers[1].grad_scale = grad_scale_for_clipping(total, 0.5)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_flat_buffers_train_like_separate_tensors(tmp_path, photos, monkeypatch):
    """8-bit AdamW on a GPU trains one flat buffer per module; on the CPU the same buffers with
    torch's AdamW must give the plain path's losses and weights."""
    from dreambooth.models import builtin_path
    from dreambooth.training import flat, loop, prepare

    made, grad_sums = [], []
    real_release = loop.release_training_memory

    def release(state, step_fn):
        if made:  # the flat run: what autograd added into the flat gradient buffer
            grad_sums.append(float(made[0]["unet"].grad.abs().sum()))
        real_release(state, step_fn)
    monkeypatch.setattr(loop, "release_training_memory", release)
    monkeypatch.setattr(prepare, "wants_flat", lambda config, device: True)
    monkeypatch.setattr(prepare, "flatten_modules",
                        lambda modules: made.append(flat.flatten_modules(modules)) or made[-1])
    # Clipping inactive. In fp32 on the CPU the flat run agrees with the plain one bit for bit on the
    # 2-core CI machine, but not on every CPU: on a 16-core host's CPU losses drifted apart by 1.5e-6
    # to 6.8e-5 relative by step 5. The optimizer's elementwise kernels see each weight at another
    # offset of the longer flat buffer, and an ulp's difference in a gradient near zero flips the sign
    # of that weight's AdamW step (about +-lr). So: losses within 1e-3, and the updates of the two
    # runs pointing the same way with the same size (a weight or chunk the optimizer missed or
    # stepped twice changes both by far more than a few sign flips do).
    extra = ["train.train_text_encoder=true", "train.max_grad_norm=1000", "train.device=cpu"]
    plain_losses, _ = run(tmp_path, photos, "plain", "never", "tiny", extra)
    flat_losses, _ = run(tmp_path, photos, "flat", "always", "tiny", extra)
    assert len(made) == 1 and set(made[0]) == {"unet", "text_encoder"}
    assert grad_sums[-1] > 0  # autograd added into the flat buffer (dropped after the last step)
    assert made[0]["unet"].grad is None
    torch.testing.assert_close(torch.tensor(flat_losses), torch.tensor(plain_losses), rtol=1e-3, atol=0)
    def unprefixed(w):  # the text encoder's file may name keys with or without "text_model."
        return {k.replace("te.text_model.", "te."): v for k, v in w.items()}
    a, b = unprefixed(weights(tmp_path / "plain", False)), unprefixed(weights(tmp_path / "flat", False))
    assert a.keys() == b.keys()
    base_folder = builtin_path("tiny-random")  # the base weights, read as the run's files are
    base = {**load_file(base_folder / "unet" / "diffusion_pytorch_model.safetensors"),
            **{f"te.{k}": v for k, v in load_file(base_folder / "text_encoder" / "model.safetensors").items()}}
    base = unprefixed(base)
    for part in ("te.", ""):  # the text encoder's keys, then the UNet's
        keys = [k for k in base if k in a and k.startswith("te.") == (part == "te.")]
        plain = torch.cat([(a[k].float() - base[k].float()).flatten() for k in keys])
        flat_update = torch.cat([(b[k].float() - base[k].float()).flatten() for k in keys])
        assert plain.norm() > 0, part  # the runs trained
        assert torch.nn.functional.cosine_similarity(flat_update, plain, dim=0) > 0.99, part
        assert abs(flat_update.norm() / plain.norm() - 1) < 0.01, part


def test_flat_views_keep_each_weights_memory_layout():
    """A channels-last weight stays channels-last inside the flat buffer, and its gradient view has
    the same strides, so flat element k of weight and gradient is the same weight (what 8-bit AdamW
    reads as raw memory)."""
    from dreambooth.training.flat import FlatModule

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(2, 8), torch.nn.Conv2d(8, 4, 1))
    net.to(memory_format=torch.channels_last)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    strides = {k: v.stride() for k, v in net.named_parameters()}
    x = torch.randn(2, 3, 9, 9).to(memory_format=torch.channels_last)
    net(x).square().sum().backward()
    expected = {k: p.grad.clone() for k, p in net.named_parameters()}
    flat = FlatModule(net, chunk=256)  # several chunks: the optimizer's tensors are views of one buffer
    size = flat.params[0].numel()
    assert len(flat.params) > 1 and all(c.grad.data_ptr() == flat.grad.data_ptr() + 4 * size * i
                                        for i, c in enumerate(flat.params))
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last)
    for name, p in net.named_parameters():
        assert p.stride() == strides[name] and p.grad.stride() == p.stride(), name
        assert torch.equal(p, before[name]), name
    flat.grad.zero_()
    net(x).square().sum().backward()  # accumulates into the flat gradient buffer
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-6, atol=1e-6)
    w = net[0].weight
    offset = (w.data_ptr() - flat.data.data_ptr()) // w.element_size()
    grad_offset = (w.grad.data_ptr() - flat.grad.data_ptr()) // w.element_size()
    assert grad_offset == offset  # weight and gradient sit at the same place in their buffers
    assert w.grad.stride() == w.stride()
    with torch.no_grad():
        for piece in flat.params:
            piece.mul_(2)  # what the optimizer does to its chunks reaches every module weight
    assert torch.equal(net[2].bias, 2 * before["2.bias"])


@pytest.mark.parametrize("optimizer,codes", [("adamw8bit_torchao", torch.uint8),
                                             ("adamwfp8_torchao", torch.float8_e4m3fn)])
def test_torchao_low_bit_adamw_keeps_quantized_states_on_padded_flat_buffers_and_tracks_adamw(optimizer, codes):
    """torchao's 8-bit and FP8 AdamW over a flat buffer: the buffer is padded to whole 256-blocks, so
    torchao keeps quantized states (it falls back to fp32 states otherwise), and a few steps land
    close to fp32 AdamW's (rounding of the moments, not different math)."""
    from dreambooth.config import TrainConfig
    from dreambooth.training.flat import BLOCK, FlatModule
    from dreambooth.training.setup import make_lr_schedule, make_optimizer

    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(70, 120), torch.nn.SiLU(), torch.nn.Linear(120, 3)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    start = [p.detach().clone() for p in nets[0].parameters()]
    flat = FlatModule(nets[1], chunk=4608)  # 8883 elements: two equal chunks of 4608 (18 blocks)
    used = sum(p.numel() for p in nets[1].parameters())
    assert [c.numel() for c in flat.params] == [4608, 4608] and flat.data.numel() - used < 2 * BLOCK
    train = TrainConfig(lr=1e-2, optimizer=optimizer, lr_schedule="cosine", steps=4)
    optimizers = [make_optimizer({"unet": nets[0]}, TrainConfig(lr=1e-2, lr_schedule="cosine", steps=4),
                                 torch.device("cpu")),
                  make_optimizer({"unet": nets[1]}, train, torch.device("cpu"), {"unet": flat})]
    schedules = [make_lr_schedule(o, {"unet": n}, train) for o, n in zip(optimizers, nets)]
    for step in range(4):
        x = torch.randn(32, 70)
        nets[0](x).square().mean().backward()
        flat.grad.zero_()
        nets[1](x).square().mean().backward()
        for opt, schedule in zip(optimizers, schedules):
            opt.step()
            schedule.step()
        optimizers[0].zero_grad(set_to_none=True)
    for piece in flat.params:
        state = optimizers[1].state[piece]
        assert state["exp_avg"].codes.dtype == codes and state["exp_avg_sq"].codes.dtype == codes
    assert float(schedules[1].get_last_lr()[0]) == pytest.approx(schedules[0].get_last_lr()[0])
    assert torch.all(flat.data[used:] == 0)  # padding stays zero
    for a, b, s in zip(nets[0].parameters(), nets[1].parameters(), start):
        moved = (a - s).abs().mean()
        assert moved > 1e-3  # both trained
        assert (a - b).abs().mean() < 0.05 * moved, "quantized states drifted away from fp32 AdamW"


def test_flat_refuses_a_weight_with_gaps():
    from dreambooth.training.flat import FlatModule

    net = torch.nn.Linear(4, 4)
    net.weight.data = torch.randn(4, 8)[:, ::2]  # every other column: not dense
    with pytest.raises(ValueError, match="not dense"):
        FlatModule(net)
    with pytest.raises(ValueError, match="multiple of 256"):
        FlatModule(torch.nn.Linear(4, 4), chunk=1000)


def test_cached_posteriors_match_encoding_one_image_at_a_time(photos):
    """The latent cache encodes several images per VAE call; each posterior must equal the one
    encoded alone (the random-crop path still encodes one image per call)."""
    from dreambooth.data.images import load_rgb
    from dreambooth.models import load_components
    from dreambooth.training.batches import ENCODE_ROWS, LatentSource

    vae = load_components("tiny-random").vae
    images = [load_rgb(p) for p in sorted(photos.glob("*.png"))] * 2  # 6 images, 12 rows: two VAE calls
    assert 2 * len(images) > ENCODE_ROWS
    source = LatentSource(images, vae, 64, crop="center", cache=True)
    for i in range(len(images)):
        for flip in (False, True):
            alone = source._encode(i, flip, None)
            cached = source._cache[(i, flip)]
            torch.testing.assert_close(cached.mean, alone.mean, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(cached.std, alone.std, rtol=1e-5, atol=1e-5)


def test_compiled_modules_cache_under_the_tool_cache(tmp_path, monkeypatch):
    """Inductor's cache (what makes a second compile cheap) goes to cache_root()/inductor, unless
    the user set TORCHINDUCTOR_CACHE_DIR."""
    from dreambooth.sampling import compiled

    monkeypatch.setenv("DREAMBOOTH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    torch.testing.assert_close(compiled(layer)(x), layer(x))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache" / "inductor")
    assert any((tmp_path / "cache" / "inductor").rglob("*"))  # the compiled code was written there
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    compiled(layer)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")


def test_offload_frozen_parks_the_vae_during_steps_and_brings_it_back_for_samples(tmp_path, photos, monkeypatch):
    """`train.offload_frozen`: the VAE and the frozen text encoder leave the device before the first
    step, no step calls them while parked, and they come back around every sample grid; the losses
    do not change. On the CPU there is nowhere to park, so "parked" is a hook that fails any call.
    On CUDA the frozen text encoder never goes to the card (it encodes on the CPU, in fp32), so the
    VAE alone is parked, and the losses differ from the bf16-encoded ones by bf16 rounding."""
    import contextlib

    from dreambooth.training import loop, prepare, state

    moves, at_sampling = [], []

    def refuse(module, args):
        raise AssertionError(f"{type(module).__name__} called while parked")

    class Guarded(state.FrozenParking):
        hooks: list = []

        def park(self):
            moves.append(("park", len(self.modules)))
            # on every submodule: `vae.encode` and `vae.decode` never call the VAE module itself
            self.hooks = [sub.register_forward_pre_hook(refuse) for m in self.modules for sub in m.modules()]

        @contextlib.contextmanager
        def back(self):
            moves.append(("back", len(self.modules)))
            for hook in self.hooks:
                hook.remove()
            yield
            self.park()

    monkeypatch.setattr(prepare, "FrozenParking", Guarded)
    real_write = loop.write_samples
    monkeypatch.setattr(loop, "write_samples", lambda *a: (at_sampling.append(moves[-1][0]), real_write(*a))[1])
    extra = ["train.offload_frozen=true", "output.sample_every=2"]
    cuda = torch.cuda.is_available()
    for fast in ("always", "never"):
        moves.clear(), at_sampling.clear()
        offloaded, _ = run(tmp_path, photos, f"parked-{fast}", fast, "tiny", extra)
        assert moves[0] == ("park", 1 if cuda else 2)  # the VAE (and the frozen text encoder), before step 1
        assert at_sampling == ["back", "back", "back"]  # steps 2 and 4 and the final grid
        plain, _ = run(tmp_path, photos, f"plain-{fast}", fast, "tiny", ["output.sample_every=2"])
        if cuda:  # bf16 keeps 8 bits: 0.4% per value (see test_fast_step_trains_like_the_plain_step_on_cuda)
            torch.testing.assert_close(torch.tensor(offloaded), torch.tensor(plain), rtol=2e-2, atol=0)
        else:
            assert offloaded == plain
    moves.clear()
    run(tmp_path, photos, "te", "always", "tiny", extra + ["train.train_text_encoder=true"])
    assert moves[0] == ("park", 1)  # the text encoder trains, so it stays
    _, events = run(tmp_path, photos, "crop", "always", "tiny", extra + ["data.crop=random"])
    assert any(isinstance(e, ev.Notice) and "offload_frozen has no effect" in e.message for e in events)


def test_frozen_parking_moves_the_frozen_modules_and_brings_them_back(monkeypatch):
    from dreambooth.config import load_config
    from dreambooth.models import load_components
    from dreambooth.training.state import FrozenParking

    components = load_components("tiny-random")
    config = load_config("tiny", {"data": {"images": ".", "class_noun": "dog"}}, ["train.offload_frozen=true"])
    parking = FrozenParking(components, config, torch.device("cpu"), park_to="meta")
    parking.park()
    assert components.vae.device.type == "meta" and components.text_encoder.device.type == "meta"
    assert next(components.unet.parameters()).device.type == "cpu"
    targets = []
    for module in parking.modules:  # meta tensors hold no data, so record the way back instead
        monkeypatch.setattr(module, "to", lambda device, m=module: targets.append((m, str(device))) or m)
    with parking.back():
        assert targets == [(components.vae, "cpu"), (components.text_encoder, "cpu")]
    assert targets[2:] == [(components.vae, "meta"), (components.text_encoder, "meta")]


def test_offload_frozen_on_cuda_keeps_frozen_text_encoders_on_the_cpu_and_encodes_there():
    """On a small card (train.offload_frozen on CUDA) the frozen text encoders never go to the card:
    parking moves the VAE alone, and the prompt embeddings are encoded where the encoders are and
    handed over in the dtype the frozen parts train in."""
    from dreambooth.config import load_config
    from dreambooth.models import load_components
    from dreambooth.training.state import FrozenParking, PromptEmbeddings, text_encoders_stay_on_cpu

    components = load_components("tiny-random-xl")
    overrides = {"data": {"images": ".", "class_noun": "dog"}}
    lean = load_config("tiny-xl-lora", overrides, ["train.offload_frozen=true"])
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert text_encoders_stay_on_cpu(lean, cuda) and not text_encoders_stay_on_cpu(lean, cpu)
    assert not text_encoders_stay_on_cpu(load_config("tiny-xl-lora", overrides, []), cuda)
    trained = load_config("tiny-xl-lora", overrides, ["train.offload_frozen=true", "train.train_text_encoder=true"])
    assert not text_encoders_stay_on_cpu(trained, cuda)
    assert FrozenParking(components, lean, cuda).modules == [components.vae]
    assert FrozenParking(components, lean, cpu).modules == [components.vae, *components.text_encoders]

    fp32 = PromptEmbeddings(components, lean, cpu)
    low = PromptEmbeddings(components, lean, cpu, torch.bfloat16)
    for a, b in zip(fp32.frozen, low.frozen):
        assert a.dtype == torch.float32 and b.dtype == torch.bfloat16 and torch.equal(a.bfloat16(), b)



@pytest.mark.parametrize("optimizer,module,extra", [("adamw8bit", "bitsandbytes", "bnb"),
                                                     ("adamw8bit_torchao", "torchao.optim", "lean"),
                                                     ("adamwfp8_torchao", "torchao.optim", "lean")])
def test_missing_8bit_optimizer_package_names_the_extra(monkeypatch, optimizer, module, extra):
    import sys

    from dreambooth.config import TrainConfig
    from dreambooth.errors import ConfigError
    from dreambooth.training.setup import make_optimizer

    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(ConfigError) as caught:
        make_optimizer({"unet": torch.nn.Linear(2, 2)}, TrainConfig(optimizer=optimizer), torch.device("cpu"))
    assert f"dreambooth[{extra}]" in str(caught.value.problems[0])


def _prepared_state(tmp_path, photos, name, monkeypatch, fast, extra=()):
    """The TrainState that training prepares, with the steps not run."""
    from dreambooth.training import loop, train_events

    seen = {}

    def no_steps(state, step_fn, stop):
        seen["state"] = state
        yield from ()

    monkeypatch.setattr(loop, "run_steps", no_steps)
    monkeypatch.setattr(loop, "FastStep", lambda state: None)
    config = load_config("tiny-lora", {"data": {"images": str(photos), "class_noun": "dog"}},
                         ["prior.enabled=false", "train.device=cpu", "train.mixed_precision=bf16",
                          f"train.fast={fast}", *extra])
    list(train_events(config, tmp_path / name))
    return seen["state"]


def test_lora_fast_step_puts_the_frozen_unet_on_the_device_in_bf16_and_keeps_adapters_fp32(
        tmp_path, photos, monkeypatch):
    """An SDXL UNet in fp32 is 10.3 GB, more than a 12 GB card has beside the rest: the fast LoRA
    step stores the frozen UNet in the autocast dtype, so it goes to the device in it directly.
    peft gives new adapters their layer's dtype; they are raised back to fp32, and start from the
    seeded fp32 initialisation rounded once to bf16."""
    from dreambooth.models.components import Components

    placed = []
    to = torch.nn.Module.to

    def spy(module, *args, **kwargs):
        if getattr(module, "_is_unet", False):
            placed.append(kwargs.get("dtype", args[1] if len(args) > 1 else None))
        return to(module, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", spy)
    original_init = Components.__init__

    def mark(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.unet._is_unet = True

    monkeypatch.setattr(Components, "__init__", mark)
    fast = _prepared_state(tmp_path, photos, "fast", monkeypatch, "always")
    assert placed[0] == torch.bfloat16
    params = dict(fast.components.unet.named_parameters())
    lora = {k: p for k, p in params.items() if "lora_" in k}
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora.values())
    assert all(p.dtype == torch.bfloat16 for k, p in params.items() if k not in lora)

    placed.clear()
    plain = dict(_prepared_state(tmp_path, photos, "plain", monkeypatch, "never").components.unet.named_parameters())
    assert placed[0] is None  # the plain step keeps fp32 weights under autocast
    for key, p in lora.items():
        assert torch.equal(p.detach(), plain[key].detach().bfloat16().float()), key
    assert any(not torch.equal(p, plain[k]) for k, p in lora.items() if "lora_A" in k)  # rounded, not the same


def test_class_images_sample_with_the_models_where_training_placed_them(tmp_path, photos, monkeypatch):
    """`pipe.to(device)` would bring text encoders kept on the CPU (offload_frozen on CUDA) back to
    the card beside the UNet, the peak the 8 GB SDXL preset cannot afford."""
    from diffusers import DiffusionPipeline

    moved = []
    monkeypatch.setattr(DiffusionPipeline, "to", lambda self, *a, **k: moved.append(a) or self)
    run(tmp_path, photos, "classes", "never", "tiny", ["prior.num_images=2", "output.sample_images=0",
                                                        "train.steps=1"])
    assert moved == []
