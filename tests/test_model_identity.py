"""The model hash behind class-image keys: computed once per file, also when a background thread
(started while the models go to the device) and the key's own call ask for it at the same time."""
import threading
import time

import pytest

from dreambooth.models import hashing
from dreambooth.models.components import hash_in_background, model_identity


def test_two_threads_asking_for_one_file_hash_it_once(tmp_path, monkeypatch):
    weights = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"w" * 4096)
    (tmp_path / "unet" / "config.json").write_text("{}")
    calls = []
    real = hashing._sha256_of

    def slow(path):
        calls.append(path.name)
        time.sleep(0.3)  # long enough for the second caller to arrive meanwhile
        return real(path)

    monkeypatch.setattr(hashing, "_sha256_of", slow)
    background = hash_in_background(tmp_path)
    time.sleep(0.05)
    results = []
    other = threading.Thread(target=lambda: results.append(model_identity(tmp_path)))
    other.start()
    results.append(model_identity(tmp_path))
    other.join()
    background.join()
    assert sorted(calls) == ["config.json", "diffusion_pytorch_model.safetensors"]  # each file once
    assert len(set(results)) == 1
    monkeypatch.setattr(hashing, "_sha256_of", real)
    weights.write_bytes(b"x" * 4096)  # a changed file is hashed again and changes the identity
    assert model_identity(tmp_path) != results[0]


def test_a_failing_background_hash_is_left_to_the_foreground_call(tmp_path, monkeypatch):
    (tmp_path / "model.safetensors").write_bytes(b"w")

    def broken(path):
        raise PermissionError(f"{path}: denied")

    monkeypatch.setattr(hashing, "_sha256_of", broken)
    hash_in_background(tmp_path).join()  # no exception escapes the thread
    with pytest.raises(PermissionError, match="denied"):  # the foreground call reports it
        model_identity(tmp_path)
