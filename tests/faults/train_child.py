"""A training run in its own process (tests/faults/test_train_sigkill.py kills it).

argv: CHECKPOINT_DIR OUT_FILE. Trains a LoRA adapter on fixed random data with
checkpoints every 3 steps and writes the trained LoRA tensors to OUT_FILE.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file

from cloud_sidecar.adapter_fit import FitPlan, fit
from cloud_sidecar.model import ADAPTABLE_LAYERS, AudioCNN
from cloud_sidecar.store_api import FEATURE_SHAPE
from fleet_protocol.labels import CLASSES


def main() -> None:
    ckpt_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = AudioCNN(len(CLASSES))
    peft_model = get_peft_model(
        model, LoraConfig(r=2, lora_alpha=2, target_modules=list(ADAPTABLE_LAYERS))
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, *FEATURE_SHAPE)).astype(np.float32)
    y = rng.integers(0, len(CLASSES), size=256).astype(np.int64)
    plan = FitPlan(epochs=8, lr=5e-3, seed=3, checkpoint_every=3, log_every=3)
    fit(model, x, y, plan, checkpoint_dir=ckpt_dir, val=(x[:32], y[:32]))
    tensors = {k: v.contiguous() for k, v in peft_model.state_dict().items() if "lora_" in k}
    save_file(tensors, str(out))


if __name__ == "__main__":
    main()
