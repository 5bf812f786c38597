"""AdamWFp8 (train.optimizer=adamwfp8): torchao's FP8 state format, AdamW's arithmetic, clipping folded
into `grad_scale`, resumable state; on CUDA the fused Triton kernel matches the torch ops."""
import logging

import pytest
import torch

from dreambooth.training.adamw_fp8 import BLOCK, AdamWFp8, dequantize, quantize

HYPER = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)


def train(optimizer_cls, steps=5, device="cpu", size=64 * BLOCK, grad_scale=None, **extra):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(size, device=device))
    optimizer = optimizer_cls([w], **HYPER, **extra)
    for step in range(steps):
        torch.manual_seed(100 + step)
        g = torch.randn(size, device=device) * torch.logspace(-3, 0, size, device=device)
        if grad_scale is not None:  # a different scale each step: Adam is blind to a constant one
            scale = grad_scale * (1 + step)
            optimizer.grad_scale = torch.tensor(scale, device=device)
            g = g * scale
        w.grad = g
        optimizer.step()
    return w.detach(), optimizer


def test_quantize_round_trip_is_within_e4m3_precision():
    x = torch.randn(4 * BLOCK) * torch.logspace(-2, 1, 4 * BLOCK)
    codes, scale = quantize(x)
    assert codes.dtype == torch.uint8 and scale.shape == (4,)
    back = dequantize(codes, scale)
    big = x.abs() > 0.1 * x.view(-1, BLOCK).abs().amax(-1).repeat_interleave(BLOCK)  # e4m3: 3 mantissa bits
    assert ((back - x).abs()[big] <= x.abs()[big] * 2**-4 + 1e-12).all()


def test_same_state_format_and_updates_as_torchao_adamwfp8():
    """Both quantize with scale = block max / 448 and update in the same order, so torchao's compiled
    optimizer and ours agree to fp32 rounding, codes included."""
    logging.getLogger("torchao").setLevel(logging.ERROR)
    torchao_optim = pytest.importorskip("torchao.optim")
    ours, ours_opt = train(AdamWFp8)
    theirs, theirs_opt = train(torchao_optim.AdamWFp8)
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=2e-6)
    mine = ours_opt.state[ours_opt.param_groups[0]["params"][0]]
    for key in ("exp_avg", "exp_avg_sq"):
        other = theirs_opt.state[theirs_opt.param_groups[0]["params"][0]][key]
        assert torch.allclose(mine[key + "_scale"], other.scale, rtol=1e-5)
        same_codes = (mine[key] == other.codes.view(torch.uint8)).float().mean()
        assert same_codes > 0.999  # a value on a rounding boundary may land one code apart


def test_tracks_fp32_adamw():
    ours, _ = train(AdamWFp8, steps=20)
    reference, _ = train(torch.optim.AdamW, steps=20)
    start, _ = train(torch.optim.AdamW, steps=0)
    moved = (reference - start).abs().mean()
    assert moved > 1e-2
    assert (ours - reference).abs().mean() < 0.05 * moved


def test_grad_scale_divides_the_gradient():
    scaled, _ = train(AdamWFp8, grad_scale=7.0)
    plain, _ = train(AdamWFp8)
    assert torch.allclose(scaled, plain, rtol=1e-6, atol=1e-7)


def test_one_group_of_mixed_tensors():
    """Quantized, small, ragged, channels-last (blocks in memory order) and gradient-less tensors in
    one group: each gets the state it should, and the channels-last weight moves exactly as its
    contiguous twin (AdamW is elementwise, and its blocks hold the same values in the same order)."""
    torch.manual_seed(0)
    conv = torch.randn(64, 32, 3, 3)  # 18432 values = 72 blocks
    twin = torch.nn.Parameter(conv.permute(0, 2, 3, 1).contiguous())  # (64, 3, 3, 32): same memory order
    params = {"big": torch.nn.Parameter(torch.randn(64 * BLOCK)), "small": torch.nn.Parameter(torch.randn(300)),
              "ragged": torch.nn.Parameter(torch.randn(16 * BLOCK + 5)), "idle": torch.nn.Parameter(torch.randn(4096)),
              "channels_last": torch.nn.Parameter(conv.contiguous(memory_format=torch.channels_last))}
    optimizer = AdamWFp8(list(params.values()) + [twin], **HYPER)
    for step in range(3):
        for name, w in params.items():
            if name != "idle":
                w.grad = torch.randn_like(w)
        twin.grad = params["channels_last"].grad.permute(0, 2, 3, 1).contiguous()
        optimizer.step()
    dtypes = {name: optimizer.state[w]["exp_avg"].dtype for name, w in params.items() if w in optimizer.state}
    assert dtypes == {"big": torch.uint8, "small": torch.float32, "ragged": torch.float32,
                      "channels_last": torch.uint8}
    assert params["channels_last"].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(params["channels_last"].detach().permute(0, 2, 3, 1), twin.detach())


def test_fused_kernel_needs_an_nvidia_gpu_with_e4m3(monkeypatch):
    from dreambooth.training import adamw_fp8

    assert not adamw_fp8.fused_kernel_runs_on(torch.device("cpu"))
    for capability, expected in [((8, 0), False), ((8, 6), False), ((8, 9), True), ((9, 0), True)]:
        adamw_fp8.fused_kernel_runs_on.cache_clear()
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, c=capability: c)
        monkeypatch.setattr(adamw_fp8, "_triton_kernel", lambda: object())
        assert adamw_fp8.fused_kernel_runs_on(torch.device("cuda", 0)) is expected, capability
    adamw_fp8.fused_kernel_runs_on.cache_clear()


def test_small_or_ragged_tensors_keep_fp32_moments():
    _, optimizer = train(AdamWFp8, size=BLOCK * 16 + 3)
    state = optimizer.state[optimizer.param_groups[0]["params"][0]]
    assert state["exp_avg"].dtype == torch.float32 and "exp_avg_scale" not in state
    _, optimizer = train(AdamWFp8, size=BLOCK * 16)
    state = optimizer.state[optimizer.param_groups[0]["params"][0]]
    assert state["exp_avg"].dtype == torch.uint8 and state["exp_avg_scale"].shape == (16,)


def test_resumed_state_continues_bit_exactly():
    """torch's loader would cast the uint8 codes to fp32 numbers; ours keeps them as bits."""
    straight, _ = train(AdamWFp8, steps=6)
    _, first = train(AdamWFp8, steps=3)
    saved = first.state_dict()
    torch.manual_seed(0)
    w = torch.nn.Parameter(first.param_groups[0]["params"][0].detach().clone())
    resumed = AdamWFp8([w], **HYPER)
    resumed.load_state_dict(saved)
    state = resumed.state[w]
    assert state["exp_avg"].dtype == torch.uint8 and state["exp_avg_sq"].dtype == torch.uint8
    for step in range(3, 6):
        torch.manual_seed(100 + step)
        w.grad = torch.randn(w.numel()) * torch.logspace(-3, 0, w.numel())
        resumed.step()
    assert torch.equal(w.detach(), straight)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused kernel runs on CUDA (Triton)")
@pytest.mark.parametrize("grad_scale", [None, 3.0])
def test_fused_kernel_matches_torch_ops(monkeypatch, grad_scale):
    from dreambooth.training import adamw_fp8

    if not adamw_fp8.fused_kernel_runs_on(torch.device("cuda")):
        pytest.skip("the fused kernel needs compute capability 8.9+ (and Triton)")
    size = 1003 * BLOCK  # not a whole number of 4-block programs: the last one is masked
    fused, fused_opt = train(AdamWFp8, device="cuda", size=size, grad_scale=grad_scale, steps=8)
    monkeypatch.setattr(adamw_fp8, "fused_kernel_runs_on", lambda device: False)
    ops, ops_opt = train(AdamWFp8, device="cuda", size=size, grad_scale=grad_scale, steps=8)
    # A value on a rounding boundary may take the neighbouring code in one of them (fp32 results can
    # differ in the last bit), and its weight then moves by a slightly different step afterwards.
    close = torch.isclose(fused, ops, rtol=1e-5, atol=1e-6).float().mean()
    assert close > 0.999
    assert (fused - ops).abs().max() < HYPER["lr"]  # never a whole step apart
    a = fused_opt.state[fused_opt.param_groups[0]["params"][0]]
    b = ops_opt.state[ops_opt.param_groups[0]["params"][0]]
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.allclose(a[key + "_scale"], b[key + "_scale"], rtol=1e-5)
        assert (a[key] == b[key]).float().mean() > 0.999
