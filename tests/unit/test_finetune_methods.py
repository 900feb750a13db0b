"""Fine-tuning methods (cloud_sidecar.finetune): full fine-tuning shipped as exact
full-rank LoRA factors that stock PEFT loads, and QLoRA refused with a reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from pydantic import ValidationError

from cloud_sidecar.config import QLORA_UNAVAILABLE, TrainConfig
from cloud_sidecar.finetune import _factorise, count_parameters, full_as_lora, prepare_full
from cloud_sidecar.model import ADAPTABLE_LAYERS, AudioCNN
from cloud_sidecar.store_api import FEATURE_SHAPE
from fleet_protocol.labels import CLASSES


def _pair() -> tuple[AudioCNN, AudioCNN]:
    torch.manual_seed(0)
    base = AudioCNN(len(CLASSES))
    tuned = AudioCNN(len(CLASSES))
    tuned.load_state_dict(base.state_dict())
    with torch.no_grad():  # a dense, full-rank change of every weight
        for layer in ADAPTABLE_LAYERS:
            w = getattr(tuned, layer).weight
            w.add_(0.05 * torch.randn_like(w))
    return base, tuned


def _x() -> torch.Tensor:
    rng = np.random.default_rng(3)
    return torch.from_numpy(rng.normal(size=(6, *FEATURE_SHAPE)).astype(np.float32))


def test_full_fine_tuning_trains_every_weight_and_no_bias() -> None:
    model = prepare_full(AudioCNN(len(CLASSES)))
    trainable, total = count_parameters(model)
    weights = sum(getattr(model, layer).weight.numel() for layer in ADAPTABLE_LAYERS)
    assert trainable == weights and total - trainable == sum(
        getattr(model, layer).bias.numel() for layer in ADAPTABLE_LAYERS
    )


def test_a_full_fine_tune_saved_as_full_rank_lora_loads_in_stock_peft_with_the_same_outputs(
    tmp_path: Path,
) -> None:
    base, tuned = _pair()
    expected = tuned.eval()(_x())
    peft_model, ranks, residual = full_as_lora(base, tuned)
    assert residual < 1e-5
    assert ranks["conv1"] == 9 and ranks["fc1"] == 64  # min(out, in * k * k) per layer
    peft_model.save_pretrained(str(tmp_path / "adapter"))

    fresh = AudioCNN(len(CLASSES))
    fresh.load_state_dict(_pair()[0].state_dict())  # the same base, loaded anew
    loaded = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(_x()), expected, atol=1e-5)


def test_a_delta_above_the_edge_rank_cap_is_truncated_and_its_residual_reported() -> None:
    delta = torch.randn(32, 40, dtype=torch.float64)
    a, b, residual = _factorise(delta, cap=8)
    assert a.shape == (8, 40) and b.shape == (32, 8)
    assert 0.1 < residual < 1.0
    a, b, residual = _factorise(delta, cap=64)
    assert a.shape[0] == 32 and residual < 1e-6


def test_config_selects_lora_by_default_full_on_request_and_refuses_qlora_with_the_reason() -> None:
    assert TrainConfig().method == "lora"
    assert TrainConfig.model_validate({"method": "full"}).method == "full"
    with pytest.raises(ValidationError, match="QLoRA is not available") as err:
        TrainConfig.model_validate({"method": "qlora"})
    assert "bitsandbytes" in str(err.value) and "bitsandbytes" in QLORA_UNAVAILABLE
    with pytest.raises(ValidationError):
        TrainConfig.model_validate({"method": "dora"})
