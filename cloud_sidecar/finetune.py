"""Fine-tuning methods: which parameters train, and how the result becomes a PEFT adapter.

Owns the choice ``train.method`` selects (recorded in the model card):

- ``lora`` (default): rank-``r`` LoRA factors on every Conv2d/Linear of ``AudioCNN``
  (``cloud_sidecar.lora.train_adapter``); the base stays frozen;
- ``full``: every weight of the model trains (``AudioCNN`` has no layers outside
  ``ADAPTABLE_LAYERS`` besides pooling); biases stay at the base's values because the
  edge adapter format (``lora-lowrank-v1``) carries weight deltas only. The trained
  delta ``W - W0`` of each layer is factorised by SVD into LoRA factors of that layer's
  full rank (``rank_pattern``, scale 1), so a full fine-tune ships in the same two
  formats as a LoRA run: PEFT's (``PeftModel.from_pretrained`` loads it) and the
  edge artifact the devices merge. The factorisation is exact up to float32 rounding
  while a layer's rank fits ``fleet_model``'s ``MAX_RANK``; above it the delta is
  truncated to the top singular values and the relative residual is recorded;
- ``qlora``: refused at config validation (``config.QLORA_UNAVAILABLE`` says why).

Invariants: the same inputs, seed and method give the same adapter; nothing here
touches the store, the audit log or the HSM.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from cloud_sidecar.config import QLORA_UNAVAILABLE
from cloud_sidecar.errors import TrainingError
from cloud_sidecar.model import ADAPTABLE_LAYERS, AudioCNN
from fleet_model.adapter import MAX_RANK

log = logging.getLogger(__name__)

Method = Literal["lora", "full", "qlora"]
METHODS: tuple[str, ...] = ("lora", "full")  # what this model can train with
LEARNING_RATES = {"lora": 5e-3, "full": 1e-3}  # per method, recorded in the model card


@dataclass(frozen=True)
class MethodRecord:
    """What the model card says about how the adapter was trained."""

    method: str
    trainable_parameters: int
    total_parameters: int
    ranks: dict[str, int]
    factorisation_residual: float  # relative Frobenius residual of full's SVD (0: LoRA)

    def as_card(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "trainable_parameters": self.trainable_parameters,
            "total_parameters": self.total_parameters,
            "ranks": self.ranks,
            "factorisation_residual": self.factorisation_residual,
            "qlora": QLORA_UNAVAILABLE,  # why the card can never name it as the method
        }


def count_parameters(module: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters of ``module``."""
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def prepare_full(model: AudioCNN) -> AudioCNN:
    """Unfreeze every weight of ``model`` (biases stay frozen: the edge format has none)."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(".weight"))
    return model


def _factorise(delta: torch.Tensor, cap: int) -> tuple[np.ndarray, np.ndarray, float]:
    """LoRA factors (A, B) with B @ A == delta (flattened per output), and the residual."""
    out = delta.shape[0]
    d = delta.detach().double().reshape(out, -1).numpy()
    u, s, vt = np.linalg.svd(d, full_matrices=False)
    keep = int((s > s[0] * 1e-7).sum()) if s.size and s[0] > 0 else 1
    k = max(1, min(keep, cap))
    a = vt[:k]
    b = u[:, :k] * s[:k]
    norm = float(np.linalg.norm(d))
    residual = float(np.linalg.norm(d - b @ a)) / norm if norm > 0 else 0.0
    return a.astype(np.float32), b.astype(np.float32), residual


def full_as_lora(base: AudioCNN, tuned: AudioCNN) -> tuple[PeftModel, dict[str, int], float]:
    """The full fine-tune ``tuned`` of ``base`` as a PEFT LoRA model of per-layer rank.

    Returns the PEFT model (save it with ``save_pretrained``), the rank of each layer and
    the worst relative residual of the factorisation (0 up to rounding when every rank
    fits ``MAX_RANK``).
    """
    factors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    ranks: dict[str, int] = {}
    worst = 0.0
    tuned_params = dict(tuned.named_parameters())
    for layer in ADAPTABLE_LAYERS:
        w0 = dict(base.named_parameters())[f"{layer}.weight"]
        w1 = tuned_params[f"{layer}.weight"]
        a, b, residual = _factorise(w1.detach() - w0.detach(), MAX_RANK)
        factors[layer], ranks[layer] = (a, b), a.shape[0]
        worst = max(worst, residual)
    if worst > 1e-4:
        log.warning("full fine-tune truncated to rank %d: relative residual %.3g", MAX_RANK, worst)
    config = LoraConfig(
        r=max(ranks.values()),
        lora_alpha=max(ranks.values()),
        rank_pattern=dict(ranks),
        alpha_pattern=dict(ranks),  # scale alpha / r == 1 for every layer
        target_modules=list(ADAPTABLE_LAYERS),
        lora_dropout=0.0,
        bias="none",
    )
    peft_model = get_peft_model(base, config)
    with torch.no_grad():
        for layer, (a, b) in factors.items():
            mod = getattr(peft_model.base_model.model, layer)
            wa, wb = mod.lora_A["default"].weight, mod.lora_B["default"].weight
            if tuple(wa.shape[:2]) != (a.shape[0], wa.shape[1]):
                raise TrainingError(f"{layer}: LoRA A {tuple(wa.shape)} cannot hold rank {len(a)}")
            wa.copy_(torch.from_numpy(a).reshape(wa.shape))
            wb.copy_(torch.from_numpy(b).reshape(wb.shape))
    peft_model.eval()
    return peft_model, ranks, round(worst, 8)


__all__ = [
    "LEARNING_RATES",
    "METHODS",
    "QLORA_UNAVAILABLE",
    "MethodRecord",
    "count_parameters",
    "full_as_lora",
    "prepare_full",
]
