"""The user's path through the CLI on the tiny random model: check -> priors -> train -> generate."""
import json

import pytest
import yaml
from PIL import Image

from dreambooth.cli import main


def run_dir_tree(run):
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and "final" not in p.parts)


@pytest.mark.parametrize("model,preset,extra", [
    ("tiny-random", "tiny", []),
    ("tiny-random", "tiny-lora", ["--set", "train.train_text_encoder=true"]),
    ("tiny-random-v", "tiny", []),
])
def test_check_priors_train_generate(tmp_path, subject_dir, model, preset, extra):
    assert main(["check", str(subject_dir), "--identifier", "sks", "--class-noun", "dog", "--resolution", "64"]) == 0
    cache = tmp_path / "cache"
    assert main(["priors", "--model", model, "--class-noun", "dog", "--num", "4", "--cache", str(cache),
                 "--set", "prior.steps=2"]) == 0
    run = tmp_path / "run"
    args = ["train", "--images", str(subject_dir), "--class-noun", "dog", "--model", model, "--preset", preset,
            "--output", str(run), "--set", f"prior.cache={cache}", *extra]
    assert main(args) == 0
    assert run_dir_tree(run) == [".dreambooth-run", ".lock",
                                 "checkpoints/step-00002/optimizer.pt", "checkpoints/step-00002/scheduler.pt",
                                 "checkpoints/step-00002/state.json", "checkpoints/step-00002/trainable.safetensors",
                                 "checkpoints/step-00004/optimizer.pt", "checkpoints/step-00004/scheduler.pt",
                                 "checkpoints/step-00004/state.json", "checkpoints/step-00004/trainable.safetensors",
                                 "config.yaml", "log.jsonl", "samples/step-00004.png"]
    log = [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "step" in r]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(r["prior_loss"] > 0 for r in log)
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["name"] == model and config["data"]["class_noun"] == "dog"
    info = json.loads((run / "final" / "dreambooth.json").read_text())
    assert info["identifier"] == "sks" and info["mode"] == ("lora" if "lora" in preset else "full")
    assert info["prediction_type"] == ("v_prediction" if model.endswith("-v") else "epsilon")
    if info["mode"] == "full":
        assert (run / "final" / "model_index.json").exists()
    else:
        assert (run / "final" / "pytorch_lora_weights.safetensors").exists()

    out = tmp_path / "gen"
    assert main(["generate", "--model", str(run), "--prompt", "a {identifier} {class} on the moon",
                 "--prompt", "a {class}", "--num", "2", "--steps", "2", "--output", str(out)]) == 0
    pngs = sorted(out.glob("0*.png"))
    assert len(pngs) == 4 and (out / "grid-0000.png").exists()
    settings = json.loads(pngs[0].with_suffix(".json").read_text())
    assert settings["prompt"] == "a sks dog on the moon" and settings["seed"] == 0
    assert Image.open(pngs[0]).size == (64, 64)


def test_existing_run_is_never_overwritten(tmp_path, subject_dir, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "precious.txt").write_text("keep me")
    code = main(["train", "--images", str(subject_dir), "--class-noun", "dog", "--preset", "tiny",
                 "--output", str(run)])
    assert code == 2 and "--resume" in capsys.readouterr().err
    assert [p.name for p in run.iterdir()] == ["precious.txt"]


def test_bad_images_stop_before_any_model_loads(tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_text("not a picture")
    (photos / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 20)
    code = main(["train", "--images", str(photos), "--class-noun", "dog", "--preset", "tiny",
                 "--model", "no/such-model-anywhere", "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "a.jpg" in err and "b.jpg" in err
    assert not (tmp_path / "run").exists()


def test_config_errors_are_listed_together(tmp_path, subject_dir, capsys):
    code = main(["train", "--images", str(subject_dir), "--class-noun", "dog", "--preset", "tiny",
                 "--output", str(tmp_path / "run"), "--set", "train.lr=-1", "--set", "data.crop=diagonal"])
    err = capsys.readouterr().err
    assert code == 2 and "train.lr" in err and "data.crop" in err


def test_unknown_model_is_a_clear_error(tmp_path, capsys):
    code = main(["priors", "--model", str(tmp_path / "missing"), "--class-noun", "dog", "--num", "1"])
    assert code == 2 and "missing" in capsys.readouterr().err


def test_offline_hub_id_fails_fast(tmp_path, capsys):
    code = main(["priors", "--model", "someone/not-cached-model", "--class-noun", "dog", "--num", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "offline" in err and "someone/not-cached-model" in err


def test_token_suggestions_are_single_tokens(capsys):
    from transformers import CLIPTokenizer

    from dreambooth.models.builtin import TOKENIZER_DIR

    assert main(["token", "--count", "5"]) == 0
    words = capsys.readouterr().out.split()
    tok = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    assert len(words) == 5 and all(len(tok(w, add_special_tokens=False).input_ids) == 1 for w in words)


def test_train_exports_requested_formats(tmp_path, subject_dir):
    from safetensors import safe_open

    run = tmp_path / "run"
    assert main(["train", "--images", str(subject_dir), "--class-noun", "dog", "--preset", "tiny-lora",
                 "--output", str(run), "--export", "lora-kohya,single-file"]) == 0
    with safe_open(run / "export" / "sks-dog-lora-kohya.safetensors", "pt") as f:
        keys = list(f.keys())
        assert all(k.startswith("lora_unet_") for k in keys) and any(k.endswith(".alpha") for k in keys)
        assert f.metadata()["modelspec.architecture"].endswith("/lora")
    assert (run / "export" / "sks-dog.safetensors").stat().st_size > 0


def test_train_refuses_unknown_export_format_before_training(tmp_path, subject_dir, capsys):
    code = main(["train", "--images", str(subject_dir), "--class-noun", "dog", "--preset", "tiny",
                 "--output", str(tmp_path / "run"), "--export", "lora-kohya,ckpt"])
    err = capsys.readouterr().err
    assert code == 2 and "ckpt" in err and "lora-kohya" in err and not (tmp_path / "run").exists()


def test_help_config_lists_every_key_and_exits(capsys):
    """The README points users at `train --help-config`: it prints every group.key with its default."""
    from dreambooth.config import GROUPS

    with pytest.raises(SystemExit) as exited:
        main(["train", "--help-config"])
    assert exited.value.code == 0
    printed = capsys.readouterr().out
    for group, cls in GROUPS.items():
        for name in cls.__dataclass_fields__:
            assert f"{group}.{name} = " in printed
