"""SDXL formats, in and out, proven against diffusers' own loaders on tiny SDXL runs.

The runs are built the way training writes final/ (`training.outputs`), without training: the tiny
SDXL with every weight perturbed (full), or random LoRA adapters with large lora_B on the UNet and
both text encoders, alpha 8 / rank 4 (lora), so a wrong conversion cannot pass on zeros or ones.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file
from test_formats import PROMPT, _image

from dreambooth.errors import ModelSourceError
from dreambooth.formats.exporters import export


def wide_xl_base(folder):
    """The tiny SDXL with a wider second text encoder (48 against 32): diffusers' from_single_file
    tells SDXL's two encoders apart by width, as in the real model (768 against 1280)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from dreambooth.models.builtin import _save_xl, tiny_xl_configs

    cfg = tiny_xl_configs()
    text_2 = dict(cfg["text_encoder_2"], hidden_size=48, intermediate_size=96, projection_dim=48)
    unet = dict(cfg["unet"], cross_attention_dim=32 + 48, projection_class_embeddings_input_dim=6 * 8 + 48)
    torch.manual_seed(0)
    _save_xl(folder, UNet2DConditionModel(**unet), AutoencoderKL(**cfg["vae"]),
             CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])),
             CLIPTextModelWithProjection(CLIPTextConfig(**text_2)), EulerDiscreteScheduler(**cfg["scheduler"]))
    return folder


def write_xl_run(root, base: str, mode: str):
    """A run directory whose final/ is what training.outputs writes for an SDXL run."""
    from peft import LoraConfig

    from dreambooth.models import load_components
    from dreambooth.training.outputs import save_lora_weights, save_pipeline_folder

    c = load_components(base)
    gen = torch.Generator().manual_seed(1)
    final = root / "final"
    final.mkdir(parents=True)
    with torch.no_grad():
        if mode == "full":
            for net in (c.unet, c.vae, *c.text_encoders):
                for p in net.parameters():
                    p.add_(torch.randn(p.shape, generator=gen) * 0.02)
            save_pipeline_folder(c, final)
        else:
            c.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
            for te in c.text_encoders:
                te.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
            for net in (c.unet, *c.text_encoders):
                for name, p in net.named_parameters():
                    if "lora_B" in name:
                        p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            save_lora_weights(c, SimpleNamespace(train=SimpleNamespace(train_text_encoder=True)), final)
    info = {"format": "dreambooth-run/1", "mode": mode, "identifier": "sks", "class_noun": "dog",
            "instance_prompt": PROMPT, "base_model": base, "base_model_identity": "",
            "prediction_type": c.prediction_type, "resolution": 64, "steps": 2, "train_text_encoder": True}
    (final / "dreambooth.json").write_text(json.dumps(info))
    (root / "config.yaml").write_text(yaml.safe_dump({"train": {"mode": mode, "lora_alpha": 8.0}}))
    return root


@pytest.fixture(scope="module")
def xl_runs(tmp_path_factory):
    wide = str(wide_xl_base(tmp_path_factory.mktemp("wide-xl") / "base"))
    return {name: write_xl_run(tmp_path_factory.mktemp(name) / "run", base, mode)
            for name, base, mode in (("full", "tiny-random-xl", "full"), ("lora", "tiny-random-xl", "lora"),
                                     ("wide-full", wide, "full"))}


def _xl_pipe(folder):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(folder)


def _states(c):
    return {part: getattr(c, part).state_dict() for part in ("unet", "vae", "text_encoder", "text_encoder_2")}


def _assert_same_weights(ours, ref):
    for part, state in _states(ref).items():
        mine = getattr(ours, part).state_dict()
        assert mine.keys() == state.keys(), part
        assert [k for k in state if not torch.equal(mine[k], state[k])] == [], part


# --- 1. single file in ------------------------------------------------------------------------------

def test_xl_single_file_loads_as_model_with_every_tensor(xl_runs, tmp_path):
    from dreambooth.model_family import model_family
    from dreambooth.models import load_components

    path = export(xl_runs["full"], "single-file", tmp_path / "xl.safetensors", dtype="fp32")
    assert model_family(str(path)).family == "tiny-xl"  # from the configs the file carries
    loaded = load_components(str(path))  # MODEL = the single file
    assert loaded.is_xl
    _assert_same_weights(loaded, load_components(str(xl_runs["full"] / "final")))


def test_xl_key_mapping_and_diffusers_reader_are_inverses(tmp_path):
    """original -> diffusers (diffusers' converters) -> original (our mapping) gives every key and
    tensor back, for all four networks of the tiny SDXL."""
    from dreambooth.formats.exporters import component_configs
    from dreambooth.formats.single_file import convert_single_file, pipeline_to_original
    from dreambooth.models import builtin_path, load_components

    def original(c):
        return pipeline_to_original(c.unet.state_dict(), c.vae.state_dict(), c.text_encoder.state_dict(),
                                    component_configs(c), c.text_encoder_2.state_dict())

    gen = torch.Generator().manual_seed(0)
    first = {k: torch.randn(v.shape, generator=gen) for k, v in original(load_components("tiny-random-xl")).items()}
    save_file(first, str(tmp_path / "xl.safetensors"))
    (tmp_path / "converted").mkdir()
    convert_single_file(tmp_path / "xl.safetensors", tmp_path / "converted", config=builtin_path("tiny-random-xl"))
    again = original(load_components(str(tmp_path / "converted")))
    assert again.keys() == first.keys()
    assert [k for k in first if not torch.equal(again[k], first[k])] == []


def _full_size_xl_shapes():
    """{key: shape} of the SDXL base architecture from the shipped configs, in the original layout
    (built on the meta device: no weights), and the networks' parameter counts."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from dreambooth.formats.config_folders import SHIPPED_CONFIGS, shipped_configs
    from dreambooth.formats.single_file import pipeline_to_original

    folder = SHIPPED_CONFIGS / "sdxl"
    with torch.device("meta"):
        nets = (UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")),
                AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
                CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")),
                CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2")))
        state = pipeline_to_original(*(n.state_dict() for n in nets[:3]), shipped_configs("sdxl"), nets[3].state_dict())
    return {k: tuple(v.shape) for k, v in state.items()}, tuple(sum(p.numel() for p in n.parameters()) for n in nets)


def test_sdxl_base_file_is_detected_by_shapes_and_matches_the_shipped_config():
    from dreambooth.formats.single_file import detect_family, match_shipped_config
    from dreambooth.model_family import family_of_shapes

    shapes, counts = _full_size_xl_shapes()
    # SDXL base 1.0: UNet 2.57 B, VAE 83.7 M, CLIP ViT-L 123 M, OpenCLIP ViT-bigG with projection 695 M
    assert counts == (2_567_463_684, 83_653_863, 123_060_480, 694_659_840)
    assert detect_family(shapes, "x") == "sdxl" and match_shipped_config(shapes, "sdxl", "x") == "sdxl"
    assert family_of_shapes(shapes) == "sdxl"
    # the shapes a published sd_xl_base_1.0.safetensors has at the keys the detection reads
    assert shapes["model.diffusion_model.label_emb.0.0.weight"] == (1280, 2816)
    assert shapes["model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"] == (640, 2048)
    assert shapes["conditioner.embedders.1.model.text_projection"] == (1280, 1280)
    assert shapes["conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"] == (3840, 1280)


def test_bad_and_partial_xl_files_get_named_errors(xl_runs, tmp_path):
    from safetensors.torch import load_file

    from dreambooth.models import detect_source, load_components

    path = export(xl_runs["full"], "single-file", tmp_path / "xl.safetensors", dtype="fp32")
    state = load_file(path)
    cases = {  # file -> what the error must name
        "unet-only": ({k: v for k, v in state.items() if k.startswith("model.diffusion_model.")},
                      "incomplete SDXL checkpoint: no the VAE (first_stage_model.*), the CLIP ViT-L"),
        "no-bigg": ({k: v for k, v in state.items() if not k.startswith("conditioner.embedders.1.")},
                    "no the OpenCLIP ViT-bigG text encoder (conditioner.embedders.1.model.*)"),
        "refiner": ({**{k: v for k, v in state.items() if not k.startswith("conditioner.")},
                     "conditioner.embedders.0.model.token_embedding.weight": torch.zeros(2, 2)}, "SDXL refiner"),
        "no-metadata": (state, "no shipped config matches this sdxl checkpoint"),  # tiny shapes, no configs
    }
    for name, (tensors, message) in cases.items():
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
        for load in (detect_source, load_components):  # the web app's check and the loader agree
            with pytest.raises(ModelSourceError, match="SDXL|sdxl") as err:
                load(str(tmp_path / f"{name}.safetensors"))
            assert message in str(err.value), (name, str(err.value))


# --- 2. single file out -----------------------------------------------------------------------------

def test_xl_single_file_generates_the_same_image_in_diffusers_from_single_file(xl_runs, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from dreambooth.formats.single_file import write_config_folder
    from dreambooth.formats.tensor_files import read_header

    run = xl_runs["wide-full"]
    path = export(run, "single-file", tmp_path / "xl.safetensors", dtype="fp32")
    shapes, metadata = read_header(path)
    write_config_folder(tmp_path / "cfg", shapes, metadata, str(path))
    pipe = StableDiffusionXLPipeline.from_single_file(str(path), config=str(tmp_path / "cfg"),
                                                      local_files_only=True, torch_dtype=torch.float32)
    reference = _xl_pipe(run / "final")
    _assert_same_weights(pipe, reference)
    np.testing.assert_allclose(_image(pipe), _image(reference), atol=1e-5)


def test_xl_single_file_layout_and_metadata(xl_runs, tmp_path):
    from dreambooth.models import load_components

    path = export(xl_runs["full"], "single-file", tmp_path / "xl.safetensors")  # default fp16
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        projection = f.get_tensor("conditioner.embedders.1.model.text_projection")
        qkv = f.get_tensor("conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight")
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "conditioner"}
    assert "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in keys
    assert "model.diffusion_model.label_emb.0.2.weight" in keys
    assert "first_stage_model.decoder.mid.attn_1.q.weight" in keys
    te2 = load_components(str(xl_runs["full"] / "final")).text_encoder_2.state_dict()
    # OpenCLIP computes x @ text_projection: the transpose of the transformers Linear weight
    assert torch.equal(projection, te2["text_projection.weight"].T.half())
    layer = "text_model.encoder.layers.1.self_attn."
    assert torch.equal(qkv, torch.cat([te2[f"{layer}{p}_proj.weight"] for p in "qkv"]).half())
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert meta["modelspec.resolution"] == "64x64" and meta["modelspec.trigger_phrase"] == "sks dog"
    assert meta["modelspec.prediction_type"] == "epsilon" and meta["dreambooth.base_model"] == "tiny-random-xl"


# --- 3. kohya LoRA and 4. PEFT LoRA, merged folder ---------------------------------------------------

def _lora_layers(pipe, adapter):
    """{part.module: delta weight} of every layer a loaded adapter changes."""
    out = {}
    for part in ("unet", "text_encoder", "text_encoder_2"):
        for name, module in getattr(pipe, part).named_modules():
            if hasattr(module, "lora_A") and adapter in module.lora_A:
                out[f"{part}.{name}"] = module.get_delta_weight(adapter)
    return out


def test_xl_kohya_lora_loads_in_diffusers_with_every_key_and_equals_peft(xl_runs, tmp_path):
    from safetensors.torch import load_file

    from dreambooth.formats.lora import load_lora_into_pipeline
    from dreambooth.models import builtin_path

    run = xl_runs["lora"]
    kohya = export(run, "lora-kohya", tmp_path / "kohya.safetensors", dtype="fp32")
    peft = export(run, "lora-peft", tmp_path / "peft.safetensors", dtype="fp32")
    state = load_file(kohya)
    assert {k.split("_")[1] for k in state} == {"unet", "te1", "te2"}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" not in state  # tiny: 3
    assert "lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_out_0.lora_up.weight" in state
    assert "lora_te2_text_model_encoder_layers_1_self_attn_out_proj.alpha" in state
    assert float(state["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha"]) == 8.0
    with safe_open(str(kohya), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    pipes = {"kohya": _xl_pipe(builtin_path("tiny-random-xl")), "peft": _xl_pipe(builtin_path("tiny-random-xl"))}
    load_lora_into_pipeline(pipes["kohya"], kohya)  # what `generate --lora FILE` does
    pipes["peft"].load_lora_weights(str(peft.parent), weight_name=peft.name, adapter_name="subject")
    layers = {name: _lora_layers(pipe, "subject") for name, pipe in pipes.items()}
    # every kohya module became a LoRA layer (none dropped), with the delta the PEFT file gives
    assert len(layers["kohya"]) == sum(k.endswith(".lora_down.weight") for k in state) == len(layers["peft"])
    assert layers["kohya"].keys() == layers["peft"].keys()
    for name, delta in layers["peft"].items():
        torch.testing.assert_close(layers["kohya"][name], delta, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(_image(pipes["kohya"]), _image(pipes["peft"]), atol=1e-5)


def _comfy_unmapped(lora, model_keys):
    """ComfyUI comfy/lora.py: model_lora_keys_unet maps `lora_unet_<original module with _>` for each
    `diffusion_model.*.weight`; model_lora_keys_clip maps `lora_te1_text_model_encoder_layers_{b}_{x}`
    to clip_l and `lora_te2_...` to clip_g for x in LORA_CLIP_MAP (q/k/v/out_proj, mlp fc1/fc2);
    load_lora takes `.alpha`, `.lora_up.weight`, `.lora_down.weight` of each mapped name and logs
    every other key as "lora key not loaded"."""
    names = {"lora_unet_" + k[len("model.diffusion_model."):-len(".weight")].replace(".", "_")
             for k in model_keys if k.startswith("model.diffusion_model.") and k.endswith(".weight")}
    clip = {"self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2"}
    layers = {k.split(".encoder.layers.")[1].split(".")[0] for k in model_keys if ".encoder.layers." in k}
    names |= {f"lora_te{i}_text_model_encoder_layers_{b}_{x}" for i in (1, 2) for b in layers for x in clip}
    loaded = {f"{n}.{s}" for n in names for s in ("alpha", "lora_up.weight", "lora_down.weight")}
    return [k for k in lora if k not in loaded]


def _a1111_unmapped(lora, model_keys):
    """A1111 extensions-builtin/Lora/networks.py: SDXL module names are `diffusion_model_<module>`,
    `0_<embedder 0 module>` and `1_<embedder 1 module>` (assign_network_names_to_compvis_modules);
    load_network maps `lora_te2_text_model_encoder_layers_{b}_{x}` through
    convert_diffusers_name_to_compvis to `1_model_transformer_resblocks_{b}_{x with attn, c_fc, c_proj}`
    (q/k/v_proj resolve to the fused attention by re_x_proj), `lora_unet` -> `diffusion_model` and
    `lora_te1_text_model` -> `0_transformer_text_model`; keys of no module are keys_failed_to_match."""
    modules = set()
    for k in model_keys:
        module = k.rsplit(".", 1)[0]
        for prefix, name in (("model.", ""), ("conditioner.embedders.0.", "0_"), ("conditioner.embedders.1.", "1_")):
            if k.startswith(prefix):
                modules.add(name + module[len(prefix):].replace(".", "_"))
    failed = []
    for key in lora:
        base = key.split(".", 1)[0]
        if base.startswith("lora_te2_text_model_encoder_layers_"):
            b, x = base[len("lora_te2_text_model_encoder_layers_"):].split("_", 1)
            x = x.replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")
            name = f"1_model_transformer_resblocks_{b}_{x}"
            name = name.rsplit("_", 2)[0] if name.endswith(("_q_proj", "_k_proj", "_v_proj")) else name
        else:
            name = base.replace("lora_unet", "diffusion_model")
            name = name.replace("lora_te1_text_model", "0_transformer_text_model")
        if name not in modules:
            failed.append(key)
    return failed


def test_xl_kohya_lora_maps_every_key_in_comfyui_and_a1111(xl_runs, tmp_path):
    from safetensors.torch import load_file

    run = xl_runs["lora"]
    kohya = load_file(export(run, "lora-kohya", tmp_path / "kohya.safetensors"))
    model = export(run, "single-file", tmp_path / "merged.safetensors")  # the keys their models have
    with safe_open(str(model), "pt") as f:
        model_keys = set(f.keys())
    assert _comfy_unmapped(kohya, model_keys) == [] and _a1111_unmapped(kohya, model_keys) == []
    # the rules find a key of no module: the diffusers name of an SDXL UNet layer is not one
    assert _a1111_unmapped({"lora_unet_down_blocks_1_attentions_0_proj_in.alpha": 0}, model_keys)


def test_xl_merged_folder_and_peft_lora_equal_the_runtime_lora(xl_runs, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from dreambooth.models import builtin_path

    run = xl_runs["lora"]
    peft = export(run, "lora-peft", tmp_path / "peft.safetensors", dtype="fp32")
    with safe_open(str(peft), "pt") as f:
        assert {k.split(".")[0] for k in f.keys()} == {"unet", "text_encoder", "text_encoder_2"}
        assert json.loads(f.metadata()["lora_adapter_metadata"])["text_encoder_2.lora_alpha"] == 8.0
    merged = export(run, "diffusers", tmp_path / "merged", dtype="fp16")
    runtime = _xl_pipe(builtin_path("tiny-random-xl"))
    runtime.load_lora_weights(str(peft.parent), weight_name=peft.name, adapter_name="subject")
    deltas = _lora_layers(runtime, "subject")
    with safe_open(str(peft), "pt") as f:  # every layer of the file is applied
        assert len(deltas) == sum(k.endswith(".lora_A.weight") for k in f.keys())
    assert {name.split(".")[0] for name in deltas} == {"unet", "text_encoder", "text_encoder_2"}
    folder = StableDiffusionXLPipeline.from_pretrained(merged)
    weights = {f"{part}.{k}": v for part in ("unet", "text_encoder", "text_encoder_2")
               for k, v in getattr(folder, part).state_dict().items()}
    for name, delta in deltas.items():
        base = runtime.components[name.split(".")[0]].get_submodule(name.split(".", 1)[1]).base_layer.weight
        torch.testing.assert_close(weights[name + ".weight"], base + delta, atol=1e-6, rtol=1e-6)
    assert (tmp_path / "merged" / "text_encoder_2" / "model.fp16.safetensors").is_file()
    info = json.loads((merged / "dreambooth.json").read_text())
    assert info["merged_lora"] and info["metadata"]["modelspec.architecture"] == "stable-diffusion-xl-v1-base"


# --- a trained run, end to end ------------------------------------------------------------------

def test_a_trained_sdxl_lora_run_exports_to_every_format_and_each_loads(train_run, tmp_path):
    """The runs above are written without training; this one is trained (LoRA on the UNet and both
    text encoders), so the boundary between what training writes to final/ and what the exporters
    read is covered as a user meets it."""
    from safetensors.torch import load_file

    from dreambooth.formats.lora import load_lora_into_pipeline
    from dreambooth.models import builtin_path, load_components

    run = train_run("xl-lora-trained", "tiny-xl-lora", ["train.train_text_encoder=true"])
    kohya = export(run, "lora-kohya", tmp_path / "kohya.safetensors", dtype="fp32")
    assert {k.split("_")[1] for k in load_file(kohya)} == {"unet", "te1", "te2"}
    single = export(run, "single-file", tmp_path / "merged.safetensors", dtype="fp32")
    merged = export(run, "diffusers", tmp_path / "merged", dtype="fp32")
    base = builtin_path("tiny-random-xl")
    runtime = _xl_pipe(base)
    load_lora_into_pipeline(runtime, kohya)
    from_single, from_folder = load_components(str(single)), load_components(str(merged))
    for part in ("unet", "text_encoder", "text_encoder_2"):
        a, b = getattr(from_single, part).state_dict(), getattr(from_folder, part).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b), part
    trained, plain = _image(_xl_pipe(merged)), _image(_xl_pipe(base))
    assert np.abs(trained - plain).max() > 1e-3  # the two training steps changed the model
    np.testing.assert_allclose(_image(runtime), trained, atol=2e-3)  # merged == LoRA applied at run time
