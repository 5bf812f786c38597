"""mixed_precision=auto: one rule for training and the planner, told from fake compute capabilities."""
from __future__ import annotations

import pytest
import torch

from dreambooth.planning import Card
from dreambooth.planning import auto_precision as planned_precision
from dreambooth.precision import resolve_precision
from dreambooth.training.prepare import mixed_precision_here


@pytest.mark.parametrize("capability,expected", [
    ((7, 5), "fp16"),  # T4, RTX 20xx: no native bf16
    ((7, 0), "fp16"),  # V100
    ((6, 1), "fp16"),  # GTX 10xx
    ((8, 0), "bf16"),  # A100
    ((8, 6), "bf16"),  # RTX 30xx
    ((9, 0), "bf16"),  # H100
    (None, "no"),      # the CPU
])
def test_auto_precision_follows_native_bf16(capability, expected):
    assert resolve_precision("auto", capability) == expected
    for given in ("no", "fp16", "bf16"):  # only auto is resolved
        assert resolve_precision(given, capability) == given


@pytest.mark.parametrize("capability,expected", [((7, 5), "fp16"), ((8, 6), "bf16")])
def test_training_resolves_auto_from_the_cards_capability(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert mixed_precision_here("auto", torch.device("cuda")) == expected
    # the planner shows the same choice for the same card (fp32 is its word for "no")
    assert planned_precision(Card("card", 16.0, capability)) == expected


def test_training_on_the_cpu_runs_full_precision(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert mixed_precision_here("auto", torch.device("cpu")) == "no"
    assert planned_precision(Card("CPU", None, None)) == "fp32"
