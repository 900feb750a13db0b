"""The oneshot trainer's Prometheus metrics: a textfile for node_exporter, kept current.

``cloud-sidecar train`` runs from a timer as a ``Type=oneshot`` unit and exits; an
endpoint of its own would be scraped at best a few times and never show how the run
ended. So the trainer writes its families (``sidecar_train_*``, declared in
``cloud_sidecar.metrics.TRAIN_SPECS``, documented in docs/metrics.md) to one ``.prom``
file that node_exporter's textfile collector (``--collector.textfile.directory``)
exports on every scrape: after each phase, after every metrics step of the training
loop (every ``train.log_every`` optimizer steps) and when the run ends.

Owns ``TrainProgress`` (the families' values and the file), ``ProgressMonitor`` (a
``cloud_sidecar.adapter_fit.Monitor`` that feeds the loop's metrics and alerts into
``TrainProgress`` and passes them on to the run's own monitor, which keeps writing
``metrics.jsonl`` and auditing alerts) and ``tracked`` (a run's start and outcome:
phase ``registered`` and gate passed, gate rejected, or failed).

Invariants: the file is replaced atomically (temp file in the same directory, fsync,
rename; the temp name does not end in ``.prom``, so the collector never reads half a
file); a metrics key the loop adds later and this module does not know is ignored
(logged once), never an error that stops training; a failure to write the file is
logged and never fails the run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cloud_sidecar.adapter_fit import Monitor
from cloud_sidecar.config import SidecarConfig
from cloud_sidecar.errors import GateRejectedError
from cloud_sidecar.metrics import PREFIX, TRAIN_PHASES, TRAIN_SPECS
from fleet_protocol.io import metrics as m
from fleet_protocol.io.files import write_atomic

log = logging.getLogger(__name__)

TEXTFILE = Path("metrics") / "train.prom"  # under data_dir unless metrics.textfile says
# the training loop's metrics keys (cloud_sidecar.adapter_fit.fit) → gauge families
GAUGES = {
    "train_loss": "train_loss",
    "val_loss": "train_val_loss",
    "grad_norm": "train_grad_norm",
    "lr": "train_learning_rate",
    "step_seconds": "train_step_seconds",
    "projected_cost": "train_projected_cost",
    "steps_planned": "train_steps_planned",
}


def textfile_path(cfg: SidecarConfig) -> Path:
    """``metrics.textfile`` when configured, else ``data_dir/metrics/train.prom``."""
    if cfg.metrics is not None and cfg.metrics.textfile is not None:
        return cfg.metrics.textfile
    return cfg.data_dir / TEXTFILE


class TrainProgress:
    """The ``sidecar_train_*`` values of one run, rewritten to ``path`` on each update."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.metrics = m.Metrics(PREFIX, TRAIN_SPECS)
        self._clock = clock
        self._unknown: set[str] = set()
        self.metrics.set("train_failed", 0)
        self.metrics.set("train_progress_ratio", 0)
        self.metrics.set_total("train_steps_total", 0)

    def phase(self, phase: str) -> None:
        if phase not in TRAIN_PHASES:
            raise KeyError(f"unknown training phase {phase!r}; known: {TRAIN_PHASES}")
        self.metrics.clear("train_phase")
        self.metrics.set("train_phase", 1, phase=phase)
        self.write()

    def step(self, step: int, values: dict[str, float]) -> None:
        """One metrics step of the training loop (``Monitor.metrics``)."""
        if self.metrics.get("train_phase", phase="train") != 1:
            self.metrics.clear("train_phase")
            self.metrics.set("train_phase", 1, phase="train")
        # a resumed run starts at its checkpoint; a fresh run in the same process at 0
        self.metrics.set_total(
            "train_steps_total", max(step, self.metrics.get("train_steps_total"))
        )
        for key, value in values.items():
            name = GAUGES.get(key)
            if name is None:
                if key not in self._unknown:
                    self._unknown.add(key)
                    log.info("training metric %r has no Prometheus family; not exported", key)
                continue
            self.metrics.set(name, float(value))
        planned = values.get("steps_planned")
        if planned:
            self.metrics.set("train_progress_ratio", min(1.0, step / float(planned)))
        self.write()

    def alert(self, kind: str) -> None:
        self.metrics.inc("train_alerts_total", kind=kind)
        self.write()

    def finished(self, gate_passed: bool) -> None:
        self.metrics.set("train_gate_passed", 1 if gate_passed else 0)
        if gate_passed:
            self.metrics.set("train_progress_ratio", 1)
            self.phase("registered")
        else:
            self.write()

    def failed(self) -> None:
        self.metrics.set("train_failed", 1)
        self.write()

    def write(self) -> None:
        self.metrics.set("train_last_run_timestamp_seconds", self._clock())
        try:
            write_atomic(self.path, self.metrics.render().encode(), 0o644)
        except OSError as exc:  # the metrics file must never fail a training run
            log.warning("cannot write training metrics to %s: %s", self.path, exc)


class ProgressMonitor:
    """Feeds ``progress`` from the training loop, then passes everything to ``inner``."""

    def __init__(self, progress: TrainProgress, inner: Monitor) -> None:
        self.progress, self.inner = progress, inner

    def metrics(self, step: int, values: dict[str, float]) -> None:
        self.progress.step(step, values)
        self.inner.metrics(step, values)

    def alert(self, kind: str, details: dict[str, Any]) -> None:
        self.progress.alert(kind)
        self.inner.alert(kind, details)


@contextmanager
def tracked(path: Path) -> Iterator[TrainProgress]:
    """A run from the dataset phase to its outcome, in the textfile at ``path``.

    Returning normally means registered (gate passed); ``GateRejectedError`` means the
    candidate was judged and refused (not a failure); any other exception is a failure.
    """
    progress = TrainProgress(path)
    progress.phase("dataset")
    try:
        yield progress
    except GateRejectedError:
        progress.finished(gate_passed=False)
        raise
    except BaseException:
        progress.failed()
        raise
    progress.finished(gate_passed=True)
