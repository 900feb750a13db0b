"""The adapter's training loop: checkpoints and resume, metrics every N steps, alerts.

The optimisation is ``pretrain.fit``'s (minibatch AdamW, one-cycle schedule, inverse
class-frequency weights, seeded permutations); this loop adds what a long run on
rented hardware needs:

- **checkpoints** every ``checkpoint_every`` steps, written atomically (temp, fsync,
  rename) into ``checkpoint_dir``: model, optimiser, schedule, the permutation
  generator and the current epoch's permutation. A run killed at any point (SIGKILL
  included) and started again with the same inputs resumes from the last checkpoint
  and ends with the same weights, bit for bit, as an uninterrupted run (tested). A
  checkpoint made for other inputs or another plan (fingerprint mismatch) is ignored;
- **metrics** every ``log_every`` steps: train loss, validation loss, gradient norm,
  learning rate, seconds per step, the planned step count and the extrapolated cost,
  to the ``Monitor`` (the caller logs them and writes them to the run's
  ``metrics.jsonl`` and the trainer's Prometheus textfile), and a progress bar when
  stderr is a terminal;
- **alerts** (``Monitor.alert``): validation loss up at 3 checkpoints in a row,
  gradient norm above ``max_grad_norm``, extrapolated cost over the budget by 20 %;
  the run **stops** (``TrainingError``) when the extrapolated cost reaches 3x the
  budget, and at the first non-finite loss.

Under ``accelerate launch`` (one process) the loop runs on the device accelerate chose,
a GPU where there is one, and hands the model back on the CPU; elsewhere it runs on the
CPU. Several processes are refused (``TrainingError``): the loop is not data-parallel.

Only reads and writes in ``checkpoint_dir``; no audit or metrics sink of its own.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import torch

from cloud_sidecar.errors import TrainingError
from fleet_protocol.io.files import write_atomic

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
BATCH = 64
ALERT_COST_RATIO = 1.2
STOP_COST_RATIO = 3.0
RISING_CHECKPOINTS = 3


@dataclass(frozen=True)
class FitPlan:
    epochs: int
    lr: float
    seed: int
    weight_decay: float = 0.0
    class_balanced: bool = True
    batch: int = BATCH
    checkpoint_every: int = 50
    log_every: int = 10
    max_grad_norm: float = 10.0
    price_per_hour: float = 0.0  # of the machine the run uses; 0: no cost tracking
    budget: float = 0.0  # for this run, same currency; 0: no budget
    method: str = "lora"  # cloud_sidecar.finetune: part of the checkpoint's fingerprint


class Monitor(Protocol):
    def metrics(self, step: int, values: dict[str, float]) -> None: ...

    def alert(self, kind: str, details: dict[str, Any]) -> None: ...


class LogMonitor:
    """A monitor that only logs (tests, library use)."""

    def __init__(self) -> None:
        self.alerts: list[tuple[str, dict[str, Any]]] = []
        self.history: list[tuple[int, dict[str, float]]] = []

    def metrics(self, step: int, values: dict[str, float]) -> None:
        self.history.append((step, values))
        log.info("step %d %s", step, values)

    def alert(self, kind: str, details: dict[str, Any]) -> None:
        self.alerts.append((kind, details))
        log.warning("training alert %s: %s", kind, details)


class _Once:
    """Passes each repeating alert kind on once per run (a noisy run alerts, not floods)."""

    REPEATING = frozenset({"grad_norm", "cost_over_budget"})

    def __init__(self, inner: Monitor) -> None:
        self.inner = inner
        self.fired: set[str] = set()

    def metrics(self, step: int, values: dict[str, float]) -> None:
        self.inner.metrics(step, values)

    def alert(self, kind: str, details: dict[str, Any]) -> None:
        if kind in self.REPEATING and kind in self.fired:
            return
        self.fired.add(kind)
        self.inner.alert(kind, details)


def _fingerprint(x: npt.NDArray[Any], y: npt.NDArray[Any], plan: FitPlan) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(x).tobytes())
    h.update(np.ascontiguousarray(y).tobytes())
    h.update(json.dumps(asdict(plan), sort_keys=True).encode())
    return h.hexdigest()


def _save(path: Path, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    write_atomic(path, buf.getvalue(), 0o600)


def _grad_norm(params: list[torch.nn.Parameter]) -> float:
    norms = [p.grad.detach().norm() for p in params if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


def training_device() -> torch.device:
    """The CPU, or under ``accelerate launch`` the device accelerate chose (one process)."""
    if "ACCELERATE_MIXED_PRECISION" not in os.environ:  # set by `accelerate launch`
        return torch.device("cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by a multi-process launch
    if world > 1:
        raise TrainingError(
            f"launched as {world} processes: the adapter's loop is one process"
            " (it signs one bundle per run); use `accelerate launch --num_processes 1`"
        )
    from accelerate import PartialState  # type: ignore[import-untyped]

    device: torch.device = PartialState().device
    return device


def fit(
    model: Any,
    x: npt.NDArray[np.float32],
    y: npt.NDArray[np.int64],
    plan: FitPlan,
    *,
    checkpoint_dir: Path | None = None,
    val: tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]] | None = None,
    monitor: Monitor | None = None,
) -> float:
    """Train ``model``'s trainable parameters on ``x``/``y``; returns the last loss."""
    monitor = _Once(monitor or LogMonitor())
    torch.manual_seed(plan.seed)
    device = training_device()
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=plan.lr, weight_decay=plan.weight_decay)
    per_epoch = (len(x) + plan.batch - 1) // plan.batch
    total = max(1, plan.epochs * per_epoch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=plan.lr, total_steps=total)
    xt, yt = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
    weight = None
    if plan.class_balanced:
        counts = torch.bincount(yt, minlength=int(yt.max()) + 1).float()
        weight = torch.where(
            counts > 0, counts.sum() / (counts.clamp(min=1) * (counts > 0).sum()), 0.0
        )
    gen = torch.Generator().manual_seed(plan.seed)
    fingerprint = _fingerprint(x, y, plan)
    step, epoch, perm = 0, 0, None
    val_losses: list[float] = []
    spent_s = 0.0
    ckpt = checkpoint_dir / CHECKPOINT if checkpoint_dir is not None else None
    if ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if state.get("fingerprint") == fingerprint:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
            gen.set_state(state["gen"])
            step, epoch, perm = state["step"], state["epoch"], state["perm"]
            val_losses, spent_s = state["val_losses"], state["spent_s"]
            log.info("resuming from the checkpoint at step %d of %d", step, total)
        else:
            log.warning("ignoring %s: made for other inputs or another plan", ckpt)
    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm  # type: ignore[import-untyped]

        bar = tqdm(total=total, initial=step, unit="step", desc="adapter")
    loss = torch.zeros(())
    t_last, steps_since = time.monotonic(), 0
    model.train()
    while epoch < plan.epochs:
        if perm is None:
            perm = torch.randperm(len(x), generator=gen)
        start = (step - epoch * per_epoch) * plan.batch
        for i in range(start, len(x), plan.batch):
            idx = perm[i : i + plan.batch]
            idx = idx.to(device)
            logits = model.logits(xt[idx])
            loss = torch.nn.functional.cross_entropy(logits, yt[idx], weight=weight)
            if not math.isfinite(float(loss.detach())):
                raise TrainingError(f"non-finite training loss at step {step}: diverged")
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            gnorm = _grad_norm(params)
            opt.step()
            sched.step()
            step += 1
            steps_since += 1
            if bar is not None:
                bar.update(1)
            if gnorm > plan.max_grad_norm:
                monitor.alert("grad_norm", {"step": step, "grad_norm": round(gnorm, 3)})
            at_ckpt = step % plan.checkpoint_every == 0
            if step % plan.log_every == 0 or at_ckpt or step == total:
                now = time.monotonic()
                per_step = (now - t_last) / max(1, steps_since)
                spent_s += now - t_last
                t_last, steps_since = now, 0
                values = {
                    "train_loss": round(float(loss.detach()), 5),
                    "grad_norm": round(gnorm, 4),
                    "lr": float(sched.get_last_lr()[0]),
                    "step_seconds": round(per_step, 5),
                    "steps_planned": total,
                }
                if val is not None and len(val[1]):
                    values["val_loss"] = round(_val_loss(model, val, weight), 5)
                    model.train()
                cost = _cost(plan, spent_s, step, total, values)
                monitor.metrics(step, values)
                if at_ckpt and "val_loss" in values:
                    val_losses.append(values["val_loss"])
                    recent = val_losses[-(RISING_CHECKPOINTS + 1) :]
                    if len(recent) == RISING_CHECKPOINTS + 1 and all(
                        b > a for a, b in itertools.pairwise(recent)
                    ):
                        monitor.alert("val_loss_rising", {"step": step, "val_losses": recent})
                if cost is not None:
                    _check_budget(plan, cost, step, monitor)
            if at_ckpt and ckpt is not None:
                _save(
                    ckpt,
                    {
                        "fingerprint": fingerprint,
                        "model": model.state_dict(),
                        "opt": opt.state_dict(),
                        "sched": sched.state_dict(),
                        "gen": gen.get_state(),
                        "step": step,
                        "epoch": epoch if i + plan.batch < len(x) else epoch + 1,
                        "perm": perm if i + plan.batch < len(x) else None,
                        "val_losses": val_losses,
                        "spent_s": spent_s,
                    },
                )
        epoch += 1
        perm = None
    if bar is not None:
        bar.close()
    model.to("cpu")
    model.eval()
    return float(loss.detach())


def _val_loss(
    model: Any, val: tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]], weight: Any
) -> float:
    model.eval()
    with torch.no_grad():
        device = next(model.parameters()).device
        logits = model.logits(torch.from_numpy(val[0]).to(device))
        labels = torch.from_numpy(val[1]).to(device)
        return float(torch.nn.functional.cross_entropy(logits, labels, weight=weight))


def _cost(
    plan: FitPlan, spent_s: float, step: int, total: int, values: dict[str, float]
) -> float | None:
    if plan.price_per_hour <= 0:
        return None
    projected = spent_s / max(1, step) * total / 3600 * plan.price_per_hour
    values["projected_cost"] = round(projected, 4)
    return projected


def _check_budget(plan: FitPlan, projected: float, step: int, monitor: Monitor) -> None:
    if plan.budget <= 0:
        return
    details = {"step": step, "projected_cost": round(projected, 4), "budget": plan.budget}
    if projected >= STOP_COST_RATIO * plan.budget:
        monitor.alert("cost_stop", details)
        raise TrainingError(
            f"stopped at step {step}: projected cost {projected:.2f} is over"
            f" {STOP_COST_RATIO:g}x the budget {plan.budget:.2f}"
        )
    if projected > ALERT_COST_RATIO * plan.budget:
        monitor.alert("cost_over_budget", details)
