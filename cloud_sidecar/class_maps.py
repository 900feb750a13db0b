"""How a dataset's own class names become the model's classes (``fleet_protocol.labels``).

Owns the built-in maps for the public sets whose CSV layout the reader knows (ESC-50,
UrbanSound8K), the operator's JSON map (``--class-map FILE``) and the one resolution
rule. Invariants:

- a map's value is a class of ``CLASSES`` or ``None``; ``None`` means "known, and
  deliberately not used" (no counterpart in the model, or speech that must never be
  trained on), so such clips are skipped and counted, never an error, even when strict;
- the built-in maps list *every* category of their set, so ``strict`` only refuses a
  name the set does not have (a typo, another version of the set);
- resolution order for a dataset label: the operator's map, then identity (the label
  already is a model class), then the layout's built-in map; nothing else;
- an operator map is untrusted input: byte-capped, JSON object of strings to a class
  name or null, at most ``MAX_MAP_ENTRIES`` entries; anything else is one
  ``DatasetError`` naming the file and the entry.

Each mapping choice is documented, with its reason, in ``docs/datasets.md``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

from cloud_sidecar.errors import DatasetError
from fleet_protocol.labels import CLASSES

MAX_MAP_ENTRIES = 10_000
MAX_LABEL_CHARS = 200

ClassMap = Mapping[str, str | None]

# ESC-50 categories with no counterpart among the model's classes (by ESC-50's groups:
# animals, natural soundscapes, human non-speech, domestic, urban).
_ESC50_WITHOUT_COUNTERPART = """
    rooster pig cow frog cat hen insects sheep crow
    sea_waves crackling_fire crickets chirping_birds water_drops pouring_water
    toilet_flush thunderstorm
    crying_baby sneezing clapping breathing coughing footsteps laughing
    brushing_teeth snoring drinking_sipping
    door_wood_knock mouse_click keyboard_typing door_wood_creaks can_opening
    washing_machine vacuum_cleaner clock_alarm clock_tick
    helicopter train church_bells airplane fireworks
    """

# ESC-50 (Piczak 2015): 50 categories x 40 five-second clips, meta/esc50.csv.
ESC50_MAP: dict[str, str | None] = {
    # counterparts
    "dog": "dog_bark",  # ESC-50's dog clips are barks
    "rain": "rain",
    "wind": "wind",
    "siren": "siren",
    "car_horn": "horn",
    "engine": "engine",
    "glass_breaking": "glass_break",
    "chainsaw": "construction",  # powered cutting at a work site
    "hand_saw": "construction",
    # no counterpart among the model's classes
    **dict.fromkeys(_ESC50_WITHOUT_COUNTERPART.split(), None),
}

# UrbanSound8K (Salamon et al. 2014): 10 classes, 8732 slices of at most 4 s in 10 folds.
URBANSOUND8K_MAP: dict[str, str | None] = {
    "car_horn": "horn",
    "dog_bark": "dog_bark",
    "drilling": "construction",
    "jackhammer": "construction",
    "engine_idling": "engine",
    "siren": "siren",
    "air_conditioner": None,  # a steady machine hum: not an engine, not traffic
    "children_playing": None,  # voices: the model is never trained on speech
    "gun_shot": None,
    "street_music": None,  # music, often with singing
}

BUILTIN_MAPS: dict[str, ClassMap] = {"esc50": ESC50_MAP, "urbansound8k": URBANSOUND8K_MAP}


def check_class_map(entries: object, where: str) -> dict[str, str | None]:
    """``entries`` as a class map, or ``DatasetError`` naming ``where`` and the bad entry."""
    if not isinstance(entries, dict):
        raise DatasetError(
            f"{where}: a class map is a JSON object {{dataset label: model class or null}}",
            where,
        )
    if len(entries) > MAX_MAP_ENTRIES:
        raise DatasetError(f"{where}: more than {MAX_MAP_ENTRIES} entries", where)
    out: dict[str, str | None] = {}
    for key, value in entries.items():
        if not isinstance(key, str) or not 0 < len(key) <= MAX_LABEL_CHARS:
            raise DatasetError(f"{where}: label {key!r} is empty or too long", where)
        if value is not None and value not in CLASSES:
            raise DatasetError(
                f"{where}: {key!r} maps to {value!r}, which is not a model class;"
                f" use one of {', '.join(CLASSES)} or null to skip it",
                where,
            )
        out[key] = value
    return out


def load_class_map(path: Path, max_bytes: int) -> tuple[dict[str, str | None], str]:
    """(the operator's JSON class map, sha256 of its bytes): byte-capped, checked."""
    try:
        with path.open("rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise DatasetError(f"cannot read the class map {path}: {exc}", str(path)) from exc
    if len(data) > max_bytes:
        raise DatasetError(
            f"class map {path} exceeds {max_bytes} bytes; is it the right file?", str(path)
        )
    try:
        entries = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise DatasetError(f"class map {path} is not UTF-8 JSON: {exc}", str(path)) from exc
    return check_class_map(entries, str(path)), hashlib.sha256(data).hexdigest()


class ClassResolver:
    """Maps a dataset label to a model class, ``None`` (skip), or unknown (``KeyError``)."""

    def __init__(self, layout: str, operator: ClassMap | None = None) -> None:
        self.operator: ClassMap = dict(operator or {})
        self.builtin: ClassMap = BUILTIN_MAPS.get(layout, {})

    def resolve(self, label: str) -> str | None:
        """The model class for ``label``; ``None`` if deliberately skipped.

        Raises ``KeyError`` when no map knows ``label`` (the caller skips it and counts
        it, or refuses the dataset when strict).
        """
        if label in self.operator:
            return self.operator[label]
        if label in CLASSES:
            return label
        return self.builtin[label]
