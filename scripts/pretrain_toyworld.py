"""Pretrain the ``toy`` base model and the oracle from scratch on rendered toy-world data (one GPU).

Stages, all inside one wall-clock budget so that a device lease never ends empty-handed:
  1. render the diffusion and oracle datasets on all CPU cores (before CUDA starts: fork-safe);
  2. train the VAE (reconstruction + tiny KL), then cache posterior means/stds of every image;
  3. train the oracle on augmented renders, half of each batch round-tripped through the VAE;
  4. train UNet + text encoder with the SD objective (epsilon, 10% caption dropout, EMA);
  5. sample every (class, context) prompt, score the samples with the oracle, save grids.
Weights are written as fp16, tarred and split into < 16 MiB parts under --out, after the VAE and
oracle stages and every --save-every seconds. Run: ``python scripts/pretrain_toyworld.py``.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import math
import os
import shutil
import tarfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dreambooth.toyworld.architecture import (
    TOKENIZER_DIR,
    build_scheduler,
    build_text_encoder,
    build_unet,
    build_vae,
    load_tokenizer,
)
from dreambooth.toyworld.dataset import render_dataset
from dreambooth.toyworld.oracle import Oracle, OracleNet, augment
from dreambooth.toyworld.quality import evaluate_base_model, grid

PART_BYTES = 15 * 2**20  # $OUT takes files up to 16 MiB


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "out"), help="where weights, logs and grids go")
    p.add_argument("--minutes", type=float, default=8.3, help="total wall-clock budget")
    p.add_argument("--vae-minutes", type=float, default=1.2)
    p.add_argument("--oracle-minutes", type=float, default=0.9)
    p.add_argument("--reserve-minutes", type=float, default=0.6, help="kept for evaluation and saving")
    p.add_argument("--n-train", type=int, default=150_000, help="rendered images for VAE/UNet")
    p.add_argument("--n-oracle", type=int, default=60_000)
    p.add_argument("--batch", type=int, default=512, help="UNet batch")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--eval-per-prompt", type=int, default=8)
    p.add_argument("--save-every", type=float, default=90.0, help="seconds between UNet checkpoints")
    p.add_argument("--resume", default=None,
                   help="diffusers folder of an earlier run: keep its VAE and oracle, continue UNet + text encoder")
    p.add_argument("--eval-guidance", type=float, nargs="+", default=[6.0])
    return p.parse_args(argv)


class Run:
    """Clock, logger and device settings shared by the stages."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.t0 = args, time.time()
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.stage_dir = Path("/tmp/toy-stage") if args.device == "cuda" else self.out / "stage"
        self.device = torch.device(args.device)
        self.amp = (torch.autocast("cuda", torch.bfloat16) if args.device == "cuda"
                    else torch.autocast("cpu", enabled=False))

    def elapsed(self) -> float:
        return time.time() - self.t0

    def log(self, **record: object) -> None:
        record = {"t": round(self.elapsed(), 1), **record}
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)


def to_float(images_u8: torch.Tensor) -> torch.Tensor:
    """(B, 64, 64, 3) uint8 -> (B, 3, 64, 64) float in [-1, 1], channels_last."""
    return (images_u8.permute(0, 3, 1, 2).float() / 127.5 - 1).contiguous(memory_format=torch.channels_last)


def lr_at(frac: float, step: int, peak: float, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak over the stage's time budget."""
    return peak * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def train_vae(run: Run, vae: torch.nn.Module, images: torch.Tensor) -> None:
    """Reconstruction (MSE + L1 + image-gradient L1, for sharp edges) plus a KL weight of 1e-6, as SD."""
    opt = torch.optim.AdamW(vae.parameters(), lr=5e-4, weight_decay=0.0)
    budget, start, step, batch = run.args.vae_minutes * 60, time.time(), 0, 256
    while (frac := (time.time() - start) / budget) < 1:
        for g in opt.param_groups:
            g["lr"] = lr_at(frac, step, 5e-4)
        x = to_float(images[torch.randint(len(images), (batch,), device=images.device)])
        with run.amp:
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample()).sample.float()
        diff = rec - x
        grad = (diff[..., 1:, :] - diff[..., :-1, :]).abs().mean() + (diff[..., 1:] - diff[..., :-1]).abs().mean()
        loss = diff.pow(2).mean() + 0.5 * diff.abs().mean() + 0.5 * grad + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0:
            run.log(stage="vae", step=step, loss=loss.item(), mse=diff.pow(2).mean().item())
        step += 1
    run.log(stage="vae", step=step, loss=loss.item(), mse=diff.pow(2).mean().item(), done=True)


@torch.no_grad()
def encode_all(run: Run, vae: torch.nn.Module, images: torch.Tensor,
               set_scale: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image (fp16), and set the VAE's latent scaling factor to 1/std
    (not when resuming: the UNet was trained with the scale already in the config)."""
    means, stds = [], []
    for i in range(0, len(images), 1024):
        with run.amp:
            post = vae.encode(to_float(images[i:i + 1024])).latent_dist
        means.append(post.mean.half())
        stds.append(post.std.half())
    mean, std = torch.cat(means), torch.cat(stds)
    sample = mean[:8192].float() + std[:8192].float() * torch.randn_like(std[:8192].float())
    if set_scale:
        vae.register_to_config(scaling_factor=float(1.0 / sample.std()))
    run.log(stage="encode", latent_std=float(sample.std()), latent_mean=float(sample.mean()))
    return mean, std


def oracle_batch(data: dict[str, torch.Tensor], idx: torch.Tensor, vae: torch.nn.Module, run: Run) -> torch.Tensor:
    """Augmented images; the first half of the batch goes through the VAE first (encode, sample, decode)."""
    x = to_float(data["images"][idx])
    half = len(idx) // 2
    with torch.no_grad(), run.amp:
        x[:half] = vae.decode(vae.encode(x[:half]).latent_dist.sample()).sample.float().clamp(-1, 1)
    return augment(x)


def oracle_accuracy(net: OracleNet, data: dict[str, torch.Tensor], vae: torch.nn.Module | None,
                    run: Run) -> dict[str, float]:
    """Per-head accuracy on (held-out) images, optionally after a VAE round-trip."""
    net.eval()
    hits = {"class": 0, "context": 0, "identity": 0}
    with torch.no_grad():
        for i in range(0, len(data["images"]), 1024):
            x = to_float(data["images"][i:i + 1024])
            with run.amp:
                if vae is not None:
                    x = vae.decode(vae.encode(x).latent_dist.sample()).sample.float().clamp(-1, 1)
                logits = net(x)
            for head in hits:
                hits[head] += (logits[head].argmax(-1) == data[head][i:i + 1024]).sum().item()
    net.train()
    return {h: v / len(data["images"]) for h, v in hits.items()}


def train_oracle(run: Run, net: OracleNet, train: dict[str, torch.Tensor], vae: torch.nn.Module) -> None:
    """Cross-entropy on the three heads, summed; AdamW with a cosine schedule over the time budget."""
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.05)
    budget, start, step = run.args.oracle_minutes * 60, time.time(), 0
    while (frac := (time.time() - start) / budget) < 1:
        for g in opt.param_groups:
            g["lr"] = lr_at(frac, step, 2e-3)
        idx = torch.randint(len(train["images"]), (512,), device=run.device)
        x = oracle_batch(train, idx, vae, run).contiguous(memory_format=torch.channels_last)
        with run.amp:
            logits = net(x)
        loss = sum(F.cross_entropy(logits[h].float(), train[h][idx]) for h in ("class", "context", "identity"))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0:
            run.log(stage="oracle", step=step, loss=loss.item())
        step += 1
    run.log(stage="oracle", step=step, loss=loss.item(), done=True)


def tensors_of(rendered, device: torch.device) -> dict[str, torch.Tensor]:
    return {"images": torch.from_numpy(rendered.images).to(device),
            "class": torch.from_numpy(rendered.class_ids).to(device),
            "context": torch.from_numpy(rendered.context_ids).to(device),
            "identity": torch.from_numpy(rendered.identity_ids).to(device)}


def tokenize_captions(captions: list[tuple[str, str]], tokenizer) -> torch.Tensor:
    """(N, 2, 77) token ids; unique captions are tokenized once (there are far fewer than N)."""
    unique = sorted({c for pair in captions for c in pair} | {""})
    ids = tokenizer(unique, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    row = {c: i for i, c in enumerate(unique)}
    index = torch.tensor([[row[a], row[b]] for a, b in captions])
    return ids[index]


def save_bundle(run: Run, vae, unet, text_encoder, oracle_net: OracleNet | None) -> None:
    """fp16 diffusers folder (+ oracle) -> tar -> parts of < 15 MiB in --out, each written atomically."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    folder = run.stage_dir / "weights"
    shutil.rmtree(folder, ignore_errors=True)
    half = [copy.deepcopy(m).to("cpu", torch.float16) for m in (vae, unet, text_encoder)]
    scheduler = build_scheduler()
    pipe = StableDiffusionPipeline(vae=half[0], unet=half[1], text_encoder=half[2], tokenizer=load_tokenizer(),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    shutil.rmtree(folder / "tokenizer")
    shutil.copytree(TOKENIZER_DIR, folder / "tokenizer")  # transformers 5 would write tokenizer.json only
    if oracle_net is not None:
        state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in oracle_net.state_dict().items()}
        save_file(state, str(run.out / "oracle.safetensors.tmp"))
        os.replace(run.out / "oracle.safetensors.tmp", run.out / "oracle.safetensors")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(folder, arcname="weights")
    data = buf.getvalue()
    for k in range(0, max(1, math.ceil(len(data) / PART_BYTES))):
        (run.out / "part.tmp").write_bytes(data[k * PART_BYTES:(k + 1) * PART_BYTES])
        os.replace(run.out / "part.tmp", run.out / f"weights.tar.{k:02d}")
    run.log(stage="save", bytes=len(data), parts=math.ceil(len(data) / PART_BYTES))


def _optimizer(unet: torch.nn.Module, text_encoder: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """AdamW; the token embedding gets no weight decay, so rows of tokens that never occur in a
    caption (``sks`` and other rare identifiers) see zero gradient and stay exactly at their init."""
    emb = text_encoder.get_input_embeddings().weight
    rest = [p for p in text_encoder.parameters() if p is not emb]
    groups = [{"params": list(unet.parameters()), "weight_decay": 0.01},
              {"params": rest, "weight_decay": 0.01}, {"params": [emb], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99))


def train_diffusion(run: Run, unet, text_encoder, mean: torch.Tensor, std: torch.Tensor, ids: torch.Tensor,
                    empty: torch.Tensor, scale: float, on_save) -> tuple[torch.nn.Module, torch.nn.Module]:
    """SD's objective (predict the added noise) with Min-SNR-5 weights (Hang et al. 2023) for faster
    convergence, 10% caption dropout for classifier-free guidance, and an EMA of the weights."""
    acp = build_scheduler().alphas_cumprod.to(run.device)
    snr = acp / (1 - acp)
    weight = snr.clamp(max=5.0) / snr  # epsilon-target form of Min-SNR-gamma
    ema = [copy.deepcopy(m).requires_grad_(False) for m in (unet, text_encoder)]
    params = [p for m in (unet, text_encoder) for p in m.parameters()]
    ema_params = [p for m in ema for p in m.parameters()]
    opt = _optimizer(unet, text_encoder, run.args.lr)
    budget = max(20.0, run.args.minutes * 60 - run.elapsed() - run.args.reserve_minutes * 60)
    start = last_save = time.time()
    step, b = 0, run.args.batch
    while (frac := (time.time() - start) / budget) < 1:
        for g in opt.param_groups:
            g["lr"] = lr_at(frac, step, run.args.lr, warmup=200)
        idx = torch.randint(len(mean), (b,), device=run.device)
        z = (mean[idx].float() + std[idx].float() * torch.randn(b, 4, 16, 16, device=run.device)) * scale
        tokens = ids[idx, torch.randint(2, (b,), device=run.device)]  # (B, 77), one of two captions
        tokens = torch.where((torch.rand(b, device=run.device) < 0.1)[:, None], empty, tokens)
        t = torch.randint(0, 1000, (b,), device=run.device)
        noise = torch.randn_like(z)
        zt = acp[t].sqrt()[:, None, None, None] * z + (1 - acp[t]).sqrt()[:, None, None, None] * noise
        with run.amp:
            pred = unet(zt.contiguous(memory_format=torch.channels_last), t, text_encoder(tokens)[0]).sample
        loss = (weight[t] * (pred.float() - noise).pow(2).mean((1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - min(0.999, (1 + step) / (10 + step)))
        if step % 100 == 0:
            run.log(stage="diffusion", step=step, loss=loss.item(), lr=opt.param_groups[0]["lr"])
        if time.time() - last_save > run.args.save_every:
            on_save(*ema)
            last_save = time.time()
        step += 1
    run.log(stage="diffusion", step=step, loss=loss.item(), done=True, samples_seen=step * b)
    return ema[0], ema[1]


def restore_unused_rows(text_encoder, init: torch.Tensor, used: torch.Tensor, run: Run) -> None:
    """Put back the initial embedding of every token that no caption contains (EMA rounding aside,
    the optimizer never moved them; this makes it exact). Logs how many rows had moved."""
    emb = text_encoder.get_input_embeddings().weight
    unused = torch.ones(len(init), dtype=torch.bool)
    unused[used.cpu()] = False
    with torch.no_grad():
        moved = (emb.detach().cpu()[unused] != init[unused]).any(1).sum().item()
        emb[unused.to(emb.device)] = init[unused].to(emb.device, emb.dtype)
    run.log(stage="restore_rows", unused_rows=int(unused.sum()), moved_before_restore=int(moved))


def evaluate(run: Run, vae, unet, text_encoder, oracle_net: OracleNet) -> None:
    """Sample all (class, context) prompts with 25 DDIM steps at guidance 6; oracle accuracy and grids."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, unet=unet.eval(), text_encoder=text_encoder.eval(),
                                   tokenizer=load_tokenizer(), scheduler=build_scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    oracle = Oracle(copy.deepcopy(oracle_net).to("cpu", torch.float32))
    batch = 216 if run.args.device == "cuda" else 16
    all_metrics = []
    for k, guidance in enumerate(run.args.eval_guidance):
        metrics, results = evaluate_base_model(pipe, oracle, per_prompt=run.args.eval_per_prompt,
                                               guidance=guidance, batch_size=batch)
        if k == 0:
            grid(results, per_cell=2).save(run.out / "samples.png")
        run.log(stage="eval", **metrics)
        all_metrics.append(metrics)
    (run.out / "metrics.json").write_text(json.dumps(all_metrics, indent=1))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run = Run(args)
    torch.manual_seed(args.seed)
    # Render first: the pool forks, which must happen before CUDA is initialised.
    diff = render_dataset("diffusion", args.n_train, args.seed, args.workers)
    if args.resume:
        run.log(stage="render", n_train=len(diff.images))
        return resume(run, diff)
    orc_train = render_dataset("oracle", args.n_oracle, args.seed + 1, args.workers)
    orc_test = render_dataset("oracle", max(500, args.n_oracle // 15), args.seed + 2, args.workers)
    run.log(stage="render", n_train=len(diff.images), n_oracle=len(orc_train.images), n_test=len(orc_test.images))
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    tokenizer = load_tokenizer()
    ids = tokenize_captions(diff.captions, tokenizer).to(run.device)
    empty = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids.to(run.device)
    vae, unet, text_encoder = (m.to(run.device, memory_format=torch.channels_last)
                               for m in (build_vae(), build_unet(), build_text_encoder()))
    init_rows = text_encoder.get_input_embeddings().weight.detach().cpu().clone()
    images = torch.from_numpy(diff.images).to(run.device)
    train_vae(run, vae, images)
    vae.eval().requires_grad_(False)
    mean, std = encode_all(run, vae, images)
    del images
    oracle_net = OracleNet().to(run.device, memory_format=torch.channels_last)
    save_bundle(run, vae, unet, text_encoder, None)
    train_oracle(run, oracle_net, tensors_of(orc_train, run.device), vae)
    test = tensors_of(orc_test, run.device)
    run.log(stage="oracle_test", clean=oracle_accuracy(oracle_net, test, None, run),
            vae_roundtrip=oracle_accuracy(oracle_net, test, vae, run))
    oracle_net.eval()
    train_and_ship(run, vae, unet, text_encoder, oracle_net, mean, std, ids, empty, init_rows)


def train_and_ship(run: Run, vae, unet, text_encoder, oracle_net, mean, std, ids, empty, init_rows) -> None:
    """Shared end of a fresh run and a resumed one: diffusion training (saving as it goes), the
    untouched token rows restored in the EMA encoder, the final bundle and its evaluation."""
    used = torch.unique(torch.cat([ids.flatten(), empty.flatten()]))
    ema_unet, ema_te = train_diffusion(
        run, unet, text_encoder, mean, std, ids, empty, vae.config.scaling_factor,
        lambda u, t: save_bundle(run, vae, u, t, oracle_net))
    restore_unused_rows(ema_te, init_rows, used, run)
    save_bundle(run, vae, ema_unet, ema_te, oracle_net)
    evaluate(run, vae, ema_unet, ema_te, oracle_net)
    run.log(stage="done", minutes=run.elapsed() / 60)


def resume(run: Run, diff) -> None:
    """Continue UNet + text encoder training from ``--resume`` (fp16 weights, loaded as fp32) with a
    fresh optimizer and warm-up; VAE, latent scale and oracle are kept as they are. Unused token rows
    are taken from the loaded encoder, where they still hold their initial values."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    folder = Path(run.args.resume)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    tokenizer = load_tokenizer()
    ids = tokenize_captions(diff.captions, tokenizer).to(run.device)
    empty = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids.to(run.device)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch.float32)
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=torch.float32)
    vae, unet, text_encoder = (m.to(run.device, memory_format=torch.channels_last) for m in (vae, unet, text_encoder))
    vae.eval().requires_grad_(False)
    unet.train(), text_encoder.train()
    init_rows = text_encoder.get_input_embeddings().weight.detach().cpu().clone()
    oracle_net = OracleNet()
    oracle_net.load_state_dict({k: v.float() for k, v in load_file(str(folder.parent / "oracle.safetensors")).items()})
    oracle_net = oracle_net.to(run.device).eval()
    mean, std = encode_all(run, vae, torch.from_numpy(diff.images).to(run.device), set_scale=False)
    train_and_ship(run, vae, unet, text_encoder, oracle_net, mean, std, ids, empty, init_rows)


if __name__ == "__main__":
    main()
