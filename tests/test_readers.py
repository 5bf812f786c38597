"""Our exports against the rules the other readers apply, each rule re-stated from the reader's source.

Nothing of the readers is vendored: each test encodes the one rule that decides whether a reader
loads our file (a key it looks for, a metadata value it compares, a file it looks beside the
checkpoint for) and cites where the reader applies it. benchmarks/readers.py runs the readers'
real code when checkouts of them are present.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from test_formats import _image

from dreambooth.formats.exporters import export


@pytest.fixture(scope="module")
def lora_runs(train_run):
    """LoRA runs on the SD 1-style and the SD 2-v-style tiny models."""
    return {name: train_run(f"lora-{name}", "tiny-lora", [f"model.name={model}"])
            for name, model in (("sd1", "tiny-random"), ("sd2v", "tiny-random-v"))}


def _keys(path):
    with safe_open(str(path), "pt") as f:
        return set(f.keys())


def _a1111_metadata(path):
    """A1111 modules/sd_models.py read_metadata_from_safetensors: string values that start with '{'
    are parsed as JSON; everything else stays a string."""
    with safe_open(str(path), "pt") as f:
        raw = f.metadata() or {}
    out = {}
    for k, v in raw.items():
        try:
            out[k] = json.loads(v) if v[:1] == "{" else v
        except ValueError:
            out[k] = v
    return out


# --- 1. diffusers folder: the text encoder layout ---------------------------------------------------

def _comfy_detect_te_model(keys):
    """ComfyUI comfy/sd.py detect_te_model (used by load_clip, which DiffusersLoader calls through
    comfy/diffusers_load.py load_diffusers): CLIP-G, CLIP-H (SD 2), CLIP-L (SD 1) are told apart
    by `text_model.encoder.layers.{30,22,0}.mlp.fc1.weight`; anything else is not a CLIP text encoder."""
    for layer, kind in ((30, "clip_g"), (22, "clip_h"), (0, "clip_l")):
        if f"text_model.encoder.layers.{layer}.mlp.fc1.weight" in keys:
            return kind
    return None


@pytest.mark.parametrize("run_name", ["full_run", "full_run_v"])
def test_diffusers_text_encoder_is_in_the_layout_every_generation_reads(request, run_name, tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel

    run = request.getfixturevalue(run_name)
    folder = export(run, "diffusers", tmp_path / "out", dtype="fp16")
    for name in ("model.safetensors", "model.fp16.safetensors"):
        keys = _keys(folder / "text_encoder" / name)
        assert _comfy_detect_te_model(keys) == "clip_l", name  # tiny: 2 layers; SD 2's 23 give clip_h
        # transformers 4.x: CLIPTextModel holds a `text_model` CLIPTextTransformer, so every key of
        # its state_dict starts with `text_model.` (position_ids is a non-persistent buffer since 4.31)
        with torch.device("meta"):
            fresh = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
        assert keys == {"text_model." + k.removeprefix("text_model.") for k in fresh.state_dict()}, name
    # transformers 5 (installed here): loads that layout with nothing missing, unexpected or re-initialized
    model, report = CLIPTextModel.from_pretrained(folder / "text_encoder", output_loading_info=True)
    assert not any(report[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), report
    reference = CLIPTextModel.from_pretrained(run / "final" / "text_encoder")
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.state_dict().items())


# --- 2. diffusers folder: fp32 main weights with an fp16 variant --------------------------------------

def test_plain_from_pretrained_generates_and_the_fp16_variant_loads(full_run, tmp_path):
    from diffusers import StableDiffusionPipeline

    folder = export(full_run, "diffusers", tmp_path / "out")  # the default dtype, fp16
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)  # no torch_dtype
    assert {p.dtype for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters()} == {torch.float32}
    image = _image(pipe)
    reference = _image(StableDiffusionPipeline.from_pretrained(full_run / "final", safety_checker=None))
    np.testing.assert_allclose(image, reference, atol=1e-5)
    # ComfyUI comfy/diffusers_load.py load_diffusers takes the first of `*.fp16.safetensors`,
    # `*.safetensors` in each part's folder
    for part, name in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "model")):
        assert ((folder / part / f"{name}.fp16.safetensors").is_file()
                and (folder / part / f"{name}.safetensors").is_file())
    half = StableDiffusionPipeline.from_pretrained(folder, variant="fp16", torch_dtype=torch.float16,
                                                   safety_checker=None)
    for part in ("unet", "vae", "text_encoder"):  # fp16 inference on CPU is not supported everywhere
        ours, full = getattr(half, part).state_dict(), getattr(pipe, part).state_dict()
        assert {v.dtype for v in ours.values()} == {torch.float16}, part
        assert all(torch.equal(ours[k], full[k].half()) for k in full), part


# --- 3. and 5. LoRA metadata as A1111 and Forge read it -----------------------------------------------

def _a1111_sd_version(metadata):
    """A1111 extensions-builtin/Lora/network.py NetworkOnDisk.detect_version."""
    if str(metadata.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    if str(metadata.get("ss_v2", "")) == "True":
        return "SD2"
    return "SD1" if metadata else "Unknown"


def _a1111_lora_listed(metadata, loaded_checkpoint):
    """A1111 extensions-builtin/Lora/ui_extra_networks_lora.py create_item: with an SD 2 checkpoint
    loaded, a LoRA is listed only if its version is SD2 (SD1 likewise; Unknown per a setting)."""
    version = _a1111_sd_version(metadata)
    return version == "Unknown" or version == loaded_checkpoint


def _a1111_build_tags(metadata):
    """A1111 extensions-builtin/Lora/ui_edit_user_metadata.py build_tags (short tags kept whole)."""
    tags = {}
    for _, tags_dict in metadata.get("ss_tag_frequency", {}).items():
        for tag, count in tags_dict.items():
            tags[tag.strip()] = tags.get(tag.strip(), 0) + int(count)
    return sorted(tags.items(), key=lambda t: -t[1])


@pytest.mark.parametrize("fmt", ["lora-kohya", "lora-peft"])
def test_lora_metadata_gives_the_sd_version_and_trigger_a1111_shows(lora_runs, fmt, tmp_path, subject_dir):
    sd1 = _a1111_metadata(export(lora_runs["sd1"], fmt, tmp_path / "sks-dog-sd1.safetensors"))
    sd2 = _a1111_metadata(export(lora_runs["sd2v"], fmt, tmp_path / "sks-dog-sd2.safetensors"))
    assert _a1111_sd_version(sd2) == "SD2" and _a1111_lora_listed(sd2, "SD2") and not _a1111_lora_listed(sd2, "SD1")
    assert _a1111_sd_version(sd1) == "SD1" and _a1111_lora_listed(sd1, "SD1") and not _a1111_lora_listed(sd1, "SD2")
    assert (sd1["ss_v2"], sd2["ss_v2"]) == ("False", "True")
    # kohya sd-scripts library/model_util.py get_model_version_str_for_sd1_sd2: sd_v1 / sd_v2 + "_v"
    assert (sd1["ss_base_model_version"], sd2["ss_base_model_version"]) == ("sd_v1", "sd_v2_v")
    # trigger phrase: kohya counts each caption's tags per image folder (train_util.py set_tag_frequency)
    photos = len(list(subject_dir.iterdir()))
    assert sd1["ss_tag_frequency"] == {subject_dir.name: {"sks dog": photos}}
    assert _a1111_build_tags(sd1) == [("sks dog", photos)]
    # A1111 network.py: alias = metadata ss_output_name, else the file name
    assert sd1["ss_output_name"] == "sks-dog-sd1"


# --- 4. v-prediction: the config beside the checkpoint ------------------------------------------------

def _a1111_config_near_filename(filename):
    """A1111 modules/sd_models_config.py find_checkpoint_config_near_filename: the checkpoint's
    name with `.yaml` replacing its extension, if that file exists (checked before any guessing)."""
    config = f"{os.path.splitext(filename)[0]}.yaml"
    return config if os.path.exists(config) else None


def test_v_prediction_single_file_has_the_config_a1111_reads(full_run, full_run_v, tmp_path):
    path = export(full_run_v, "single-file", tmp_path / "sks-dog-v.safetensors")
    config = _a1111_config_near_filename(str(path))
    assert config is not None
    ldm = yaml.safe_load(open(config))
    assert ldm["model"]["target"] == "ldm.models.diffusion.ddpm.LatentDiffusion"
    params = ldm["model"]["params"]
    assert params["parameterization"] == "v"  # ldm's DDPM default is "eps"
    unet = json.loads((full_run_v / "final" / "unet" / "config.json").read_text())
    shapes = {k: f.get_slice(k).get_shape() for f in [safe_open(str(path), "pt")] for k in f.keys()}
    # the UNet the yaml describes has our tensors' shapes where A1111's UNetModel reads them
    assert shapes["model.diffusion_model.input_blocks.0.0.weight"][:2] == [
        params["unet_config"]["params"]["model_channels"], params["unet_config"]["params"]["in_channels"]]
    assert params["unet_config"]["params"]["context_dim"] == unet["cross_attention_dim"]
    assert params["cond_stage_config"]["target"].endswith("FrozenOpenCLIPEmbedder")
    eps = export(full_run, "single-file", tmp_path / "sks-dog.safetensors")
    assert _a1111_config_near_filename(str(eps)) is None  # epsilon models: A1111's guess is right


# --- 6. kohya is the default LoRA layout --------------------------------------------------------------

def test_lora_default_format_is_kohya(lora_runs, tmp_path):
    from dreambooth.formats.exporters import export_after_training

    path = export(lora_runs["sd1"], "lora", tmp_path / "default.safetensors")
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in _keys(path))
    [after] = export_after_training(lora_runs["sd1"], ["lora"])
    assert after.name == "sks-dog-lora-kohya.safetensors"


# --- 7. SDXL single file: what ComfyUI, kohya and A1111 read ------------------------------------------

def _comfy_sdxl_unet_config(shapes):
    """ComfyUI comfy/model_detection.py detect_unet_config, the values comfy/supported_models.py SDXL
    matches on: model_channels from input_blocks.0.0, context_dim from the first attn2.to_k,
    adm_in_channels from label_emb.0.0, transformer_depth counted per input resnet block, linear proj_in."""
    u = "model.diffusion_model."
    inputs = sorted({int(k.split(".")[3]) for k in shapes if k.startswith(u + "input_blocks.")})
    blocks = [n for n in inputs[1:] if f"{u}input_blocks.{n}.0.op.weight" not in shapes]  # not downsamplers
    depth = [len({k.split(".")[6] for k in shapes if k.startswith(f"{u}input_blocks.{n}.1.transformer_blocks.")})
             for n in blocks]
    first = next(n for n, d in zip(blocks, depth) if d)
    return {"model_channels": shapes[u + "input_blocks.0.0.weight"][0],
            "context_dim": shapes[f"{u}input_blocks.{first}.1.transformer_blocks.0.attn2.to_k.weight"][1],
            "adm_in_channels": shapes[u + "label_emb.0.0.weight"][1], "transformer_depth": depth,
            "use_linear_in_transformer": len(shapes[f"{u}input_blocks.{first}.1.proj_in.weight"]) == 2}


def _openclip_to_hf(state, prefix):
    """ComfyUI comfy/utils.py clip_text_transformers_convert (SDXL process_clip_state_dict, for
    conditioner.embedders.1.model.) and kohya library/sdxl_model_util.py
    convert_sdxl_text_encoder_2_checkpoint: resblocks -> encoder.layers, in_proj split in three
    (q, k, v), ln_final/positional_embedding/token_embedding renamed; text_projection is transposed
    by ComfyUI (and diffusers), taken as it is by kohya (as for Stability's own file)."""
    out = {}
    for key, v in state.items():
        if not key.startswith(prefix) or key.endswith("logit_scale"):
            continue
        k = key[len(prefix):]
        if k.endswith(("attn.in_proj_weight", "attn.in_proj_bias")):
            layer, kind = k.split(".")[2], k.rsplit("_", 1)[1]
            for name, part in zip("qkv", v.chunk(3)):
                out[f"text_model.encoder.layers.{layer}.self_attn.{name}_proj.{kind}"] = part
            continue
        for old, new in (("transformer.resblocks.", "text_model.encoder.layers."), ("ln_1", "layer_norm1"),
                         ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"),
                         ("attn.out_proj", "self_attn.out_proj"), ("ln_final", "text_model.final_layer_norm"),
                         ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
                         ("token_embedding.weight", "text_model.embeddings.token_embedding.weight")):
            k = k.replace(old, new)
        out["text_projection.weight" if k == "text_projection" else k] = v.T if k == "text_projection" else v
    return out


def test_sdxl_single_file_is_what_comfyui_kohya_and_a1111_read(tmp_path):
    from test_formats_xl import _full_size_xl_shapes, write_xl_run
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from dreambooth.formats.single_file import unet_key
    from dreambooth.models import load_components

    shapes, _ = _full_size_xl_shapes()
    # ComfyUI comfy/supported_models.py SDXL.unet_config: this is what makes it pick SDXL
    assert _comfy_sdxl_unet_config(shapes) == {"model_channels": 320, "context_dim": 2048, "adm_in_channels": 2816,
                                               "transformer_depth": [0, 0, 2, 2, 10, 10],
                                               "use_linear_in_transformer": True}
    # A1111 modules/sd_models_config.py guess_model_config_from_state_dict: sd_xl_base.yaml when
    # conditioner.embedders.1.model.ln_final.weight is present
    assert "conditioner.embedders.1.model.ln_final.weight" in shapes
    # kohya library/sdxl_model_util.py make_unet_conversion_map (SDXL: 3 blocks per level, upsampler at .2)
    up_attn = [True, True, False]
    for diffusers, original in (("down_blocks.1.attentions.1.proj_in.weight", "input_blocks.5.1.proj_in.weight"),
                                ("down_blocks.2.resnets.0.conv1.weight", "input_blocks.7.0.in_layers.2.weight"),
                                ("down_blocks.1.downsamplers.0.conv.weight", "input_blocks.6.0.op.weight"),
                                ("up_blocks.0.resnets.2.conv_shortcut.weight",
                                 "output_blocks.2.0.skip_connection.weight"),
                                ("up_blocks.1.upsamplers.0.conv.weight", "output_blocks.5.2.conv.weight"),
                                ("up_blocks.2.attentions.0.norm.weight", "output_blocks.6.1.norm.weight"),
                                ("add_embedding.linear_2.bias", "label_emb.0.2.bias")):
        assert unet_key(diffusers, 2, up_attn) == original
    run = write_xl_run(tmp_path / "run", "tiny-random-xl", "full")
    path = export(run, "single-file", tmp_path / "xl.safetensors", dtype="fp32")
    with safe_open(str(path), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    final = load_components(str(run / "final"))
    # both readers rebuild the second encoder in the transformers 4 layout; kohya's
    # _load_state_dict_on_device raises on any missing or unexpected key, so the key sets must be equal
    te2 = _openclip_to_hf(state, "conditioner.embedders.1.model.")
    with torch.device("meta"):
        fresh = CLIPTextModelWithProjection(CLIPTextConfig(**final.text_encoder_2.config.to_dict()))
    assert te2.keys() == set(fresh.state_dict())
    assert all(torch.equal(v, final.text_encoder_2.state_dict()[k]) for k, v in te2.items())
    # ComfyUI SDXL.process_clip_state_dict renames conditioner.embedders.0.transformer.text_model to
    # clip_l.transformer.text_model; kohya strips conditioner.embedders.0.transformer. and loads CLIPTextModel
    te1 = {k.removeprefix("conditioner.embedders.0.transformer."): v for k, v in state.items()
           if k.startswith("conditioner.embedders.0.transformer.")}
    with torch.device("meta"):
        fresh = CLIPTextModel(CLIPTextConfig(**final.text_encoder.config.to_dict()))
    assert te1.keys() == {"text_model." + k.removeprefix("text_model.") for k in fresh.state_dict()}
    assert _comfy_detect_te_model(te1) == "clip_l"
