"""Speech clips for the scene generator, rendered by the real ``espeak-ng`` binary.

Owns: the sentence bank (short everyday sentences in EU languages), the choice of
voice variant, speed and pitch, the call to ``espeak-ng -w`` and the on-disk cache.

Invariants:
- a clip is mono float32 at 16 kHz (espeak's 22050 Hz resampled with
  ``resample_poly(320, 441)``), leading/trailing near-silence trimmed, peak 0.5;
- the random draws made from ``rng`` do not depend on the cache state, so a scene
  renders identically with a cold or a warm cache;
- cache entries are keyed by sha256 of (lang, voice, speed, pitch, text, espeak
  version) and written temp -> fsync -> rename; a corrupt or oversized entry is
  re-rendered, never trusted;
- everything read back from espeak or the cache has a byte cap (``MAX_WAV_BYTES``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import logging
import os
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np
import numpy.typing as npt

from devstack.errors import SpeechRenderError
from devstack.procs import require_tool

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
ESPEAK_RATE = 22_050
MAX_WAV_BYTES = 4 * 1024 * 1024  # ~90 s of 16-bit audio at 22 kHz: far above any sentence
PEAK = 0.5
_TRIM_DB = -50.0  # leading/trailing samples below this (re the clip peak) are cut

FloatArray = npt.NDArray[np.float32]

# Short everyday sentences, three per language. Keys are espeak-ng voice names.
_SENTENCES: dict[str, tuple[str, ...]] = {
    "en": (
        "Could you tell me where the train station is?",
        "I will meet you at the corner in ten minutes.",
        "The weather is much colder than yesterday.",
    ),
    "de": (
        "Guten Morgen, wie geht es Ihnen heute?",
        "Ich warte an der Haltestelle auf den Bus.",
        "Kannst du mich bitte später zurückrufen?",
    ),
    "fr": (
        "Bonjour, je cherche la gare centrale.",
        "Nous allons au marché demain matin.",
        "Il fait vraiment froid ce soir, tu ne trouves pas?",
    ),
    "es": (
        "Perdone, ¿sabe dónde está la farmacia?",
        "Mañana vamos a comer con mis padres.",
        "El autobús llega siempre tarde por la mañana.",
    ),
    "it": (
        "Scusi, a che ora parte il prossimo treno?",
        "Ci vediamo davanti al bar alle otto.",
        "Oggi il traffico in centro è terribile.",
    ),
    "nl": (
        "Goedemorgen, waar is het dichtstbijzijnde station?",
        "Ik fiets elke dag naar mijn werk.",
        "Zullen we straks samen koffie drinken?",
    ),
    "pl": (
        "Przepraszam, gdzie jest przystanek tramwajowy?",
        "Spotkajmy się jutro przed szkołą.",
        "Dzisiaj jest bardzo zimno na ulicy.",
    ),
    "pt": (
        "Desculpe, onde fica a estação de metro?",
        "Vamos jantar fora hoje à noite.",
        "O autocarro está atrasado outra vez.",
    ),
    "sv": (
        "Ursäkta, var ligger centralstationen?",
        "Vi ses vid kaféet klockan tre.",
        "Det regnar hela dagen idag.",
    ),
    "cs": (
        "Promiňte, kde je nejbližší zastávka?",
        "Zítra jedeme vlakem do Brna.",
        "Dnes je venku opravdu velká zima.",
    ),
    "ro": (
        "Scuzați, unde este gara de nord?",
        "Ne vedem mâine dimineață la birou.",
        "Astăzi plouă în tot orașul.",
    ),
    "el": (
        "Συγγνώμη, πού είναι ο σταθμός του μετρό;",
        "Θα σε δω αύριο το πρωί στο γραφείο.",
        "Σήμερα κάνει πολύ ζέστη στην πόλη.",
    ),
    "fi": (
        "Anteeksi, missä on lähin bussipysäkki?",
        "Nähdään huomenna kahvilassa.",
        "Tänään sataa koko päivän.",
    ),
    "hu": (
        "Elnézést, hol van a legközelebbi megálló?",
        "Holnap reggel találkozunk az irodában.",
        "Ma nagyon hideg van az utcán.",
    ),
    "da": (
        "Undskyld, hvor ligger banegården?",
        "Vi ses i morgen ved caféen.",
        "Det blæser meget i dag.",
    ),
    "sk": (
        "Prepáčte, kde je najbližšia zastávka?",
        "Zajtra ideme vlakom do Bratislavy.",
        "Dnes je vonku veľmi chladno.",
    ),
    "hr": (
        "Oprostite, gdje je autobusna stanica?",
        "Vidimo se sutra ujutro na poslu.",
        "Danas je jako hladno vani.",
    ),
    "bg": (
        "Извинете, къде е спирката на автобуса?",
        "Ще се видим утре сутринта.",
        "Днес е много студено навън.",
    ),
    "lt": (
        "Atsiprašau, kur yra autobusų stotis?",
        "Susitiksime rytoj ryte kavinėje.",
        "Šiandien lauke labai šalta.",
    ),
    "et": (
        "Vabandage, kus on lähim bussipeatus?",
        "Kohtume homme hommikul kohvikus.",
        "Täna on väljas väga külm.",
    ),
}

LANGUAGES: tuple[str, ...] = tuple(_SENTENCES)

# espeak-ng voice variants (files under espeak-ng-data/voices/!v), male and female.
_VARIANTS: tuple[str, ...] = ("m1", "m2", "m3", "m4", "m7", "f1", "f2", "f3", "f4", "f5")
_SPEED_WPM = (130, 195)
_PITCH = (25, 75)


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/sovereign-edge/speech`` (``~/.cache`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sovereign-edge" / "speech"


@functools.cache
def espeak_version() -> str:
    """The first line of ``espeak-ng --version`` (part of every cache key)."""
    exe = require_tool("espeak-ng")
    out = subprocess.run(
        [exe, "--version"], capture_output=True, text=True, timeout=10, check=False
    ).stdout
    return out.splitlines()[0].strip() if out else "unknown"


def _cache_key(lang: str, voice: str, speed: int, pitch: int, text: str) -> str:
    material = "\x1f".join((lang, voice, str(speed), str(pitch), text, espeak_version()))
    return hashlib.sha256(material.encode("utf-8")).hexdigest()


def _decode_wav(data: bytes) -> FloatArray:
    """16-bit mono WAV bytes -> float32 in [-1, 1] at the file's rate (checked 22050)."""
    if len(data) > MAX_WAV_BYTES:
        raise SpeechRenderError(f"espeak output {len(data)} bytes > cap {MAX_WAV_BYTES}")
    try:
        with wave.open(io.BytesIO(data)) as w:
            if w.getnchannels() != 1 or w.getsampwidth() != 2 or w.getframerate() != ESPEAK_RATE:
                raise SpeechRenderError(
                    f"unexpected espeak wav format: {w.getnchannels()} ch, "
                    f"{w.getsampwidth()} B, {w.getframerate()} Hz"
                )
            frames = w.readframes(w.getnframes())
    except (wave.Error, EOFError) as exc:
        raise SpeechRenderError(f"espeak output is not a WAV file: {exc}") from exc
    return (np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0).astype(np.float32)


def _postprocess(x22: FloatArray) -> FloatArray:
    """Resample to 16 kHz, trim leading/trailing near-silence, normalise the peak."""
    from scipy.signal import resample_poly

    x = np.asarray(resample_poly(x22, 320, 441), dtype=np.float32)
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    if peak <= 0.0:
        raise SpeechRenderError("espeak produced silence")
    loud = np.flatnonzero(np.abs(x) > peak * 10.0 ** (_TRIM_DB / 20.0))
    x = x[int(loud[0]) : int(loud[-1]) + 1]
    return (x * (PEAK / peak)).astype(np.float32)


def render(lang: str, voice: str, speed: int, pitch: int, text: str) -> FloatArray:
    """Run espeak-ng once (no cache) and return the 16 kHz clip."""
    exe = require_tool("espeak-ng")
    with tempfile.TemporaryDirectory(prefix="espeak-") as tmp:
        wav = Path(tmp) / "out.wav"
        cmd = [exe, "-v", f"{lang}+{voice}", "-s", str(speed), "-p", str(pitch), "-w", str(wav)]
        proc = subprocess.run([*cmd, "--", text], capture_output=True, timeout=30, check=False)
        if proc.returncode != 0 or not wav.exists():
            err = proc.stderr[:500].decode("utf-8", "replace")
            raise SpeechRenderError(f"espeak-ng {lang}+{voice} failed ({proc.returncode}): {err}")
        if wav.stat().st_size > MAX_WAV_BYTES:
            raise SpeechRenderError(f"espeak output larger than {MAX_WAV_BYTES} bytes")
        data = wav.read_bytes()
    return _postprocess(_decode_wav(data))


def _load_cached(path: Path) -> FloatArray | None:
    try:
        if path.stat().st_size > MAX_WAV_BYTES:
            log.warning("speech cache entry %s over cap, re-rendering", path)
            return None
        with path.open("rb") as f:
            arr = np.load(f, allow_pickle=False)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("speech cache entry %s unreadable (%s), re-rendering", path, exc)
        return None
    if arr.dtype != np.float32 or arr.ndim != 1 or arr.size == 0:
        log.warning("speech cache entry %s malformed, re-rendering", path)
        return None
    return np.asarray(arr, dtype=np.float32)


def _store_cached(path: Path, clip: FloatArray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npy")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, clip, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def speech_clip(lang: str, rng: np.random.Generator, cache_dir: Path | None = None) -> FloatArray:
    """One sentence in ``lang`` with a random voice variant, speed and pitch.

    Raises ``ToolMissingError`` when espeak-ng is not installed, ``SpeechRenderError``
    when it fails, ``ValueError`` for a language outside ``LANGUAGES``.
    """
    if lang not in _SENTENCES:
        raise ValueError(f"unknown speech language {lang!r}; choose from {LANGUAGES}")
    sentences = _SENTENCES[lang]
    text = sentences[int(rng.integers(len(sentences)))]
    voice = _VARIANTS[int(rng.integers(len(_VARIANTS)))]
    speed = int(rng.integers(_SPEED_WPM[0], _SPEED_WPM[1] + 1))
    pitch = int(rng.integers(_PITCH[0], _PITCH[1] + 1))
    path = (cache_dir or default_cache_dir()) / f"{_cache_key(lang, voice, speed, pitch, text)}.npy"
    cached = _load_cached(path)
    if cached is not None:
        return cached
    clip = render(lang, voice, speed, pitch, text)
    log.debug(
        "rendered %s+%s s=%s p=%s (%d samples) -> %s", lang, voice, speed, pitch, clip.size, path
    )
    _store_cached(path, clip)
    return clip
