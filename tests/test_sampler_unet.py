"""`prior.fast`: class images from a copy of the UNet in the frozen dtype, replayed as CUDA graphs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dreambooth.models import load_components
from dreambooth.sampler_unet import GraphedUNet, sampling_unet
from dreambooth.sampling import make_pipeline, sample_images

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def _inputs(unet, batch: int, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator("cpu").manual_seed(seed)
    size = unet.config.sample_size
    sample = torch.randn(batch, unet.config.in_channels, size, size, generator=g).to(device, dtype)
    context = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g).to(device, dtype)
    return sample, torch.tensor(501, device=device), context


def test_the_copy_holds_the_weights_in_the_sampling_dtype_and_leaves_the_unet_alone():
    unet = load_components("tiny-random").unet.to(memory_format=torch.channels_last)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    graphed = sampling_unet(unet, torch.bfloat16)
    copy = graphed.inner
    assert copy is not unet and copy.dtype == torch.bfloat16 and unet.dtype == torch.float32
    assert not any(p.requires_grad for p in copy.parameters())
    for name, value in copy.state_dict().items():
        assert torch.equal(value, before[name].to(torch.bfloat16)), name
        assert value.data_ptr() != unet.state_dict()[name].data_ptr(), name
        if value.dim() == 4:  # the UNet's layout (channels-last on CUDA) is kept
            assert value.is_contiguous(memory_format=torch.channels_last), name
    with torch.no_grad():
        for param in copy.parameters():  # writing the copy must not reach the UNet
            param.zero_()
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
    assert sampling_unet(unet, torch.float32).inner is unet  # already in the dtype: no copy


def test_the_wrapper_looks_like_the_unet_to_a_pipeline_and_computes_the_same_off_cuda():
    components = load_components("tiny-random")
    unet = components.unet
    graphed = GraphedUNet(unet)
    assert graphed.config is unet.config and graphed.dtype == unet.dtype and graphed.device == unet.device
    sample, t, context = _inputs(unet, 2)
    with torch.no_grad():
        expect = unet(sample, t, context).sample
        assert torch.equal(graphed(sample, t, context).sample, expect)
        assert torch.equal(graphed(sample, t, context, return_dict=False)[0], expect)
    assert graphed.captured == 0  # the CPU has no graphs: every call is the UNet's own
    pipe = make_pipeline(components, "dpmpp", graphed=torch.float32)
    assert isinstance(pipe.unet, GraphedUNet) and pipe.unet.inner is unet
    options = dict(steps=3, guidance=5.0, resolution=64, latents=True)
    plain = sample_images(make_pipeline(components, "dpmpp"), ["a dog"], [4], **options)
    assert torch.equal(sample_images(pipe, ["a dog"], [4], **options)[0], plain[0])


@cuda_only
def test_graph_replays_give_the_eager_outputs_for_every_batch_shape():
    unet = load_components("tiny-random").unet.to("cuda")
    graphed = sampling_unet(unet, torch.bfloat16)
    copy = graphed.inner
    with torch.no_grad():
        for batch in (4, 2, 4):  # a shorter last batch gets its own graph in the shared pool
            for step, t in enumerate((901, 501, 101, 11)):
                sample, _, context = _inputs(unet, batch, "cuda", torch.bfloat16, seed=step)
                t = torch.tensor(t, device="cuda")
                out = graphed(sample, t, context, return_dict=False)[0]
                expect = copy(sample, t, context, return_dict=False)[0]
                static = [c.output for c in graphed._graphs.values() if c.output is not None]
                assert all(out.data_ptr() != o.data_ptr() for o in static)  # a copy, not the graph's buffer
                torch.testing.assert_close(out, expect, rtol=0, atol=0)
    assert graphed.captured == 2


@cuda_only
def test_graphed_class_images_match_the_plain_pipeline_in_the_same_dtype():
    components = load_components("tiny-random")
    components.vae.to("cuda", torch.bfloat16)
    components.text_encoder.to("cuda", torch.bfloat16)
    components.unet.to("cuda")  # fp32, as before a full fine-tune
    options = dict(steps=6, guidance=5.0, resolution=64, latents=True, batch_size=3)
    prompts, seeds = ["a photo of a dog"] * 5, list(range(5))
    fast = sample_images(make_pipeline(components, "dpmpp", graphed=torch.bfloat16), prompts, seeds, **options)
    components.unet.to(torch.bfloat16)
    plain = sample_images(make_pipeline(components, "dpmpp"), prompts, seeds, **options)
    assert len(fast) == len(plain) == 5
    for a, b in zip(fast, plain):
        assert np.abs((a - b).numpy()).max() < 2e-2 * max(1.0, b.abs().max().item())
