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
