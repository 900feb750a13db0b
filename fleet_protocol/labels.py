"""The sound-event label set shared by the scene generator, the model and the events topic.

Invariant: the order of ``CLASSES`` is the model's output order; changing it changes
``LABELS_VERSION`` and requires a new base model.
"""

from __future__ import annotations

LABELS_VERSION = "city-events-v1"
CLASSES: tuple[str, ...] = (
    "silence",
    "traffic",
    "engine",
    "siren",
    "horn",
    "glass_break",
    "construction",
    "rain",
    "wind",
    "dog_bark",
)
CLASS_INDEX: dict[str, int] = {c: i for i, c in enumerate(CLASSES)}
N_CLASSES = len(CLASSES)
