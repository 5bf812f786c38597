"""Reading HF_HUB_OFFLINE: one function, the values huggingface_hub itself accepts."""
from __future__ import annotations

import pytest

from dreambooth.models import hub_offline


@pytest.mark.parametrize("value, offline", [("1", True), ("true", True), ("ON", True), (" yes ", True),
                                            ("0", False), ("", False), ("false", False), (None, False)])
def test_hub_offline_reads_the_environment_at_call_time(monkeypatch, value, offline):
    if value is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert hub_offline() is offline


def test_full_size_random_builtins_are_built_from_the_shipped_configs(tmp_path, monkeypatch):
    """random-sd15 / random-sd21 are the shipped SD config folders with seeded random weights. The
    real widths take minutes on a CPU, so this builds the same folder layout with narrowed widths
    and loads it through the ordinary loader."""
    import json
    import shutil

    from dreambooth.model_family import model_family
    from dreambooth.models import builtin, load_components

    assert (model_family("random-sd21").family, model_family("random-sd21").resolution) == ("sd21", 768)
    assert (model_family("random-sd15").family, model_family("random-sd15").resolution) == ("sd15", 512)
    narrow = tmp_path / "configs"
    shutil.copytree(builtin.SHIPPED_CONFIGS / "sd21", narrow / "sd21")
    for part, widths in (("unet", [32, 32, 64, 64]), ("vae", [32, 32, 32, 32])):
        path = narrow / "sd21" / part / "config.json"
        config = json.loads(path.read_text())
        config["block_out_channels"] = widths
        if part == "unet":
            config.update(cross_attention_dim=32, attention_head_dim=[2, 2, 4, 4], layers_per_block=1)
        else:
            config.update(layers_per_block=1)
        path.write_text(json.dumps(config))
    text = narrow / "sd21" / "text_encoder" / "config.json"
    text.write_text(json.dumps({**json.loads(text.read_text()), "hidden_size": 32, "intermediate_size": 64,
                                "num_hidden_layers": 2, "num_attention_heads": 4, "projection_dim": 32}))
    monkeypatch.setattr(builtin, "SHIPPED_CONFIGS", narrow)
    monkeypatch.setenv("DREAMBOOTH_CACHE", str(tmp_path / "cache"))
    folder = builtin.builtin_path("random-sd21")
    assert folder.parent == tmp_path / "cache" / "builtin" and (folder / "tokenizer" / "vocab.json").is_file()
    components = load_components("random-sd21")
    assert components.prediction_type == "v_prediction"
    assert components.unet.config.sample_size == 96  # 768 px, as SD 2.1
    assert components.tokenizer("a photo of sks dog").input_ids == [49406, 320, 1125, 539, 48136, 1929, 49407]
    again = builtin.builtin_path("random-sd21")  # built once; the same seeded weights
    assert again == folder
