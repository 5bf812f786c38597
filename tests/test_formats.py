"""Export formats and single-file reading, proven against diffusers' own loaders on tiny runs.

Every comparison is of outputs (images, hidden states) or of every tensor, never of file names alone.
The LoRA run gets random, large lora_B weights and lora_alpha != rank, because a zero LoRA (peft's
gaussian init) or a scale of 1 would let a wrong conversion pass.
"""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dreambooth.errors import ConfigError, ModelSourceError, UnsafeCheckpointError
from dreambooth.formats.exporters import ExportError, export, export_after_training

PROMPT = "a photo of sks dog"


@pytest.fixture(scope="module")
def lora_run(train_run):
    """A LoRA run on UNet and text encoder, alpha 8 / rank 4 (scale 2), with random non-zero lora_B."""
    run = train_run("lora", "tiny-lora", ["train.train_text_encoder=true", "train.lora_alpha=8.0"])
    path = run / "final" / "pytorch_lora_weights.safetensors"
    state = load_file(path)
    gen = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(v.shape, generator=gen) * 0.3 if ".up." in k else v) for k, v in state.items()}
    save_file(state, str(path))
    return run


def _image(pipe, seed=0):
    pipe.set_progress_bar_config(disable=True)
    out = pipe(PROMPT, num_inference_steps=3, guidance_scale=7.5, height=64, width=64,
               generator=torch.Generator().manual_seed(seed), output_type="np")
    return out.images[0]


def _pipe(folder):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)


def _from_single_file(path, tmp_path):
    """diffusers' own single-file loader, with the config folder our reader derives (offline)."""
    from diffusers import StableDiffusionPipeline

    from dreambooth.formats.single_file import write_config_folder
    from dreambooth.formats.tensor_files import read_header

    shapes, metadata = read_header(path)
    write_config_folder(tmp_path / "cfg", shapes, metadata, str(path))
    return StableDiffusionPipeline.from_single_file(str(path), config=str(tmp_path / "cfg"),
                                                    local_files_only=True, torch_dtype=torch.float32)


@pytest.mark.parametrize("run_name", ["full_run", "full_run_v"])
def test_single_file_generates_the_same_image(request, run_name, tmp_path):
    run = request.getfixturevalue(run_name)
    reference = _image(_pipe(run / "final"))
    fp32 = export(run, "single-file", tmp_path / "model.safetensors", dtype="fp32")
    pipe = _from_single_file(fp32, tmp_path / "a")
    assert pipe.scheduler.config.prediction_type == ("v_prediction" if run_name == "full_run_v" else "epsilon")
    np.testing.assert_allclose(_image(pipe), reference, atol=1e-5)
    fp16 = export(run, "single-file", tmp_path / "model-fp16.safetensors", dtype="fp16")
    with safe_open(str(fp16), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16
    # fp16 tolerance, made exact: the fp16 file equals the run's weights rounded to fp16
    rounded = _pipe(run / "final")
    for part in (rounded.unet, rounded.vae, rounded.text_encoder):
        part.to(torch.float16).to(torch.float32)
    image16 = _image(_from_single_file(fp16, tmp_path / "b"))
    np.testing.assert_allclose(image16, _image(rounded), atol=1e-5)


def test_single_file_layout_and_metadata(full_run, full_run_v, tmp_path):
    sd1 = export(full_run, "single-file", tmp_path / "sd1.safetensors")
    sd2 = export(full_run_v, "single-file", tmp_path / "sd2.safetensors")
    with safe_open(str(sd1), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in keys
    assert "first_stage_model.decoder.mid.attn_1.q.weight" in keys
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert meta["modelspec.architecture"] == "stable-diffusion-v1"
    assert meta["modelspec.prediction_type"] == "epsilon" and meta["modelspec.resolution"] == "64x64"
    assert meta["dreambooth.identifier"] == "sks" and meta["dreambooth.class_noun"] == "dog"
    assert meta["dreambooth.base_model"] == "tiny-random" and "modelspec.date" in meta
    assert json.loads(meta["dreambooth.training_config"])["train"]["mode"] == "full"
    with safe_open(str(sd2), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        assert f.get_slice("first_stage_model.decoder.mid.attn_1.q.weight").get_shape()[2:] == [1, 1]
    assert "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight" in keys
    assert "cond_stage_model.model.transformer.resblocks.0.mlp.c_fc.weight" in keys
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v"
    assert meta["modelspec.prediction_type"] == "v"


@pytest.mark.parametrize("run_name", ["full_run", "full_run_v"])
def test_round_trip_through_model_reproduces_every_tensor(request, run_name, tmp_path):
    from dreambooth.models import load_components

    run = request.getfixturevalue(run_name)
    path = export(run, "single-file", tmp_path / "model.safetensors", dtype="fp32")
    loaded = load_components(str(path))  # MODEL = the single file
    reference = load_components(str(run / "final"))
    for part in ("unet", "vae", "text_encoder"):
        ours, ref = getattr(loaded, part).state_dict(), getattr(reference, part).state_dict()
        assert ours.keys() == ref.keys()
        assert all(torch.equal(ours[k], ref[k]) for k in ref), part
    assert loaded.prediction_type == reference.prediction_type
    assert load_components(str(path)).folder == loaded.folder  # converted once, then cached


@pytest.mark.parametrize("model", ["tiny-random", "tiny-random-v"])
def test_key_mapping_and_diffusers_reader_are_inverses(model, tmp_path):
    """original -> diffusers (diffusers' own converter) -> original (our mapping) gives every key and
    tensor back, so a drift in either direction (a swapped block index, a missed rename) fails here."""
    from dreambooth.formats.single_file import convert_single_file, pipeline_to_original
    from dreambooth.models import builtin_path, load_components

    def original(c):
        configs = {"unet": dict(c.unet.config), "vae": dict(c.vae.config),
                   "text_encoder": c.text_encoder.config.to_dict()}
        return pipeline_to_original(c.unet.state_dict(), c.vae.state_dict(), c.text_encoder.state_dict(), configs)

    folder = builtin_path(model)
    gen = torch.Generator().manual_seed(0)  # distinct values everywhere: tiny inits repeat (ones, zeros)
    # our fillers for the OpenCLIP keys diffusers drops (identity text_projection, a zero 24th layer) stay
    first = {k: v if k.endswith("text_projection") or ".resblocks.23." in k else torch.randn(v.shape, generator=gen)
             for k, v in original(load_components(model)).items()}
    save_file(first, str(tmp_path / "model.safetensors"))
    (tmp_path / "converted").mkdir()
    convert_single_file(tmp_path / "model.safetensors", tmp_path / "converted", config=folder)
    again = original(load_components(str(tmp_path / "converted")))
    assert again.keys() == first.keys()
    assert [k for k in first if not torch.equal(again[k], first[k])] == []


def test_kohya_lora_equals_peft_lora(lora_run, tmp_path):
    peft = export(lora_run, "lora-peft", tmp_path / "peft.safetensors", dtype="fp32")
    kohya = export(lora_run, "lora-kohya", tmp_path / "kohya.safetensors", dtype="fp32")
    state = load_file(kohya)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down") for k in state)
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up")
               for k in state)
    assert float(state["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha"]) == 8.0
    with safe_open(str(kohya), "pt") as f:
        assert f.metadata()["modelspec.architecture"] == "stable-diffusion-v1/lora"
    base = json.loads((lora_run / "final" / "dreambooth.json").read_text())["base_model"]
    from dreambooth.formats.lora import load_lora_into_pipeline
    from dreambooth.models import builtin_path

    pipes = {"peft": _pipe(builtin_path(base)), "kohya": _pipe(builtin_path(base))}
    pipes["peft"].load_lora_weights(str(peft.parent), weight_name=peft.name)
    load_lora_into_pipeline(pipes["kohya"], kohya)  # what `generate --lora FILE` does
    hidden = {n: _text_hidden(p) for n, p in pipes.items()}
    torch.testing.assert_close(hidden["kohya"], hidden["peft"], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(hidden["peft"], _text_hidden(_pipe(builtin_path(base))), atol=1e-3)  # te LoRA matters
    np.testing.assert_allclose(_image(pipes["kohya"]), _image(pipes["peft"]), atol=1e-5)


def _unet_out(pipe, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    latents, context = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 77, 32, generator=gen)
    with torch.no_grad():
        return pipe.unet(latents.to(dtype), 10, context.to(dtype)).sample


def _in_float64(module, fn, pipe):
    """fn(pipe) with `module` in float64 (then back to float32)."""
    module.to(torch.float64)
    try:
        return fn(pipe, torch.float64)
    finally:
        module.to(torch.float32)


def _text_hidden(pipe, dtype=None):  # token ids in; the encoder's dtype decides
    ids = pipe.tokenizer(PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def test_merged_lora_equals_runtime_lora(lora_run, tmp_path):
    from dreambooth.models import builtin_path, load_components

    peft = export(lora_run, "lora-peft", tmp_path / "peft.safetensors", dtype="fp32")
    merged = export(lora_run, "diffusers", tmp_path / "merged", dtype="fp32")
    runtime = _pipe(builtin_path("tiny-random"))
    runtime.load_lora_weights(str(peft.parent), weight_name=peft.name)
    base, merged_pipe = _pipe(builtin_path("tiny-random")), _pipe(merged)
    # Weights: merged == base + the delta PEFT applies at run time (alpha/r = 2), layer by layer.
    merged_weights = {**{f"unet.{k}": v for k, v in merged_pipe.unet.state_dict().items()},
                      **{f"text_encoder.{k}": v for k, v in merged_pipe.text_encoder.state_dict().items()}}
    checked = 0
    for part in ("unet", "text_encoder"):
        for name, module in getattr(runtime, part).named_modules():
            if hasattr(module, "lora_A") and "default_0" in module.lora_A:
                expected = module.base_layer.weight + module.get_delta_weight("default_0")
                torch.testing.assert_close(merged_weights[f"{part}.{name}.weight"], expected, atol=1e-6, rtol=1e-6)
                checked += 1
    assert checked == 80 + 8  # UNet: 10 attention layers x 8 (to_q/k/v/out of attn1, attn2); text: 2 x 4
    # Outputs: equal up to fp32 rounding. Random weights with large deltas amplify rounding a lot
    # (1e-4 to 1e-2 relative, depending on the trained adapters and the CPU), so both fp32 models are
    # compared with the runtime model in float64: the merged one may be no further from it than a few
    # times the runtime model's own fp32 rounding error.
    for name, fn in (("unet", _unet_out), ("text_encoder", _text_hidden)):
        ours, theirs, plain = fn(merged_pipe), fn(runtime), fn(base)
        scale = theirs.abs().max()
        exact = _in_float64(getattr(runtime, name), fn, runtime)
        rounding = (theirs.double() - exact).abs().max() / scale
        error = (ours.double() - exact).abs().max() / scale
        assert error <= max(2e-3, 4 * rounding), (name, float(error), float(rounding))
        assert (ours - plain).abs().max() > max(0.05, 10 * rounding) * scale, name  # the LoRA matters
    info = json.loads((merged / "dreambooth.json").read_text())
    assert info["merged_lora"] and info["metadata"]["modelspec.architecture"] == "stable-diffusion-v1"
    single = export(lora_run, "single-file", tmp_path / "merged.safetensors", dtype="fp32")
    from_single, from_folder = load_components(str(single)), load_components(str(merged))
    for part in ("unet", "text_encoder"):
        a, b = getattr(from_single, part).state_dict(), getattr(from_folder, part).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b), part


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling would call open(marker, "w"): a file appears if code ran
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    from dreambooth.models import load_components

    marker = tmp_path / "pwned"
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "callback": _Evil(marker)}, path)
    with open(tmp_path / "plain.ckpt", "wb") as f:  # a bare pickle, not torch's zip format
        pickle.dump(_Evil(marker), f)
    assert not marker.exists()
    for p in (path, tmp_path / "plain.ckpt"):
        with pytest.raises(UnsafeCheckpointError, match="arbitrary code") as err:
            load_components(str(p))
        assert "safetensors" in str(err.value)
    assert not marker.exists()


def test_tensor_only_pickle_loads_like_the_safetensors(full_run, tmp_path):
    from dreambooth.models import load_components

    path = export(full_run, "single-file", tmp_path / "model.safetensors", dtype="fp32")
    torch.save({"state_dict": load_file(path), "global_step": 2}, tmp_path / "model.ckpt")
    # no metadata in a pickle: the tiny shapes match no shipped config, and the error says what to do
    with pytest.raises(ModelSourceError, match="no shipped config matches") as err:
        load_components(str(tmp_path / "model.ckpt"))
    assert "input_blocks.0.0.weight [32, 4, 3, 3]" in str(err.value) and ".config/" in str(err.value)
    sidecar = tmp_path / "model.config"  # the documented way out: a config folder next to the file
    sidecar.mkdir()
    for f in (full_run / "final").rglob("*.json"):
        (sidecar / f.relative_to(full_run / "final")).parent.mkdir(parents=True, exist_ok=True)
        (sidecar / f.relative_to(full_run / "final")).write_bytes(f.read_bytes())
    loaded, ref = load_components(str(tmp_path / "model.ckpt")), load_components(str(full_run / "final"))
    assert all(torch.equal(loaded.unet.state_dict()[k], v) for k, v in ref.unet.state_dict().items())


def test_unknown_layouts_get_clear_errors(tmp_path):
    from dreambooth.models import load_components

    save_file({"encoder.weight": torch.zeros(2)}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(ModelSourceError, match="original layout") as err:
        load_components(str(tmp_path / "odd.safetensors"))
    assert "encoder.weight" in str(err.value) and "config" in str(err.value)
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(ModelSourceError, match="--lora"):
        load_components(str(tmp_path / "lora.safetensors"))


def test_shipped_configs_are_the_published_architectures():
    """Parameter counts of SD 1.5 and SD 2.1 (built on the meta device, no weights) and shape matching."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dreambooth.formats.config_folders import SHIPPED_CONFIGS
    from dreambooth.formats.single_file import match_shipped_config

    expected = {"sd15": (859_520_964, 83_653_863, 123_060_480), "sd21": (865_910_724, 83_653_863, 340_387_840)}
    for name, counts in expected.items():
        folder = SHIPPED_CONFIGS / name
        with torch.device("meta"):
            nets = (UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")),
                    AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
                    CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")))
        assert tuple(sum(p.numel() for p in n.parameters()) for n in nets) == counts
    u = "model.diffusion_model."
    sd15 = {u + "input_blocks.0.0.weight": (320, 4, 3, 3),
            u + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
            "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768)}
    assert match_shipped_config(sd15, "sd1", "x") == "sd15"
    sd21 = {k: v for k, v in sd15.items() if "cond_stage" not in k}
    sd21.update({u + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
                 "cond_stage_model.model.token_embedding.weight": (49408, 1024)})
    assert match_shipped_config(sd21, "sd2", "x") == "sd21"


def test_exports_refuse_to_overwrite_and_leave_nothing_half_written(full_run, tmp_path, monkeypatch):
    existing = tmp_path / "taken.safetensors"
    existing.write_text("keep me")
    with pytest.raises(ConfigError, match="taken.safetensors"):
        export(full_run, "single-file", existing)
    assert existing.read_text() == "keep me"
    with pytest.raises(ConfigError, match="needs a LoRA run"):
        export(full_run, "lora-kohya", tmp_path / "k.safetensors")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken)
    with pytest.raises(ExportError, match="disk full"):
        export(full_run, "single-file", tmp_path / "new.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.safetensors"]


def test_cli_export_and_export_after_training(lora_run, tmp_path, capsys):
    from dreambooth.cli import main

    out = tmp_path / "cli.safetensors"
    assert main(["export", str(lora_run), "--format", "lora-peft", "--output", str(out)]) == 0
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert json.loads(meta["lora_adapter_metadata"])["unet.lora_alpha"] == 8.0
    assert main(["export", str(lora_run), "--format", "lora-peft", "--output", str(out)]) != 0
    assert "cli.safetensors" in capsys.readouterr().err
    paths = export_after_training(lora_run, ["lora-kohya", "lora-peft"])
    assert [p.name for p in paths] == ["sks-dog-lora-kohya.safetensors", "sks-dog-lora-peft.safetensors"]
    assert all(p.parent == lora_run / "export" and p.is_file() for p in paths)


def test_folder_export_never_replaces_a_folder_that_appeared_meanwhile(tmp_path):
    from dreambooth.formats.writing import write_folder_atomically

    target = tmp_path / "model-diffusers"

    def write(tmp):
        (tmp / "model_index.json").write_text("{}")
        target.mkdir()  # another export finished first
        (target / "theirs.json").write_text("keep me")

    with pytest.raises(ExportError, match="already exists"):
        write_folder_atomically(target, write)
    assert [p.name for p in tmp_path.iterdir()] == ["model-diffusers"]  # no temporary left
    assert [p.name for p in target.iterdir()] == ["theirs.json"]
    assert write_folder_atomically(tmp_path / "new", lambda tmp: (tmp / "a.json").write_text("{}")).is_dir()
