"""Recordings of real people for the privacy benchmarks, fetched from pinned Debian packages.

Owns: which recordings the privacy benchmarks use, where they come from (package,
version, licence), the split of voices into a *tuning* set (the only one any gate
setting or detector may be tuned or trained on) and a *held-out* set (reported, never
tuned on), loading them as 16 kHz mono float32, and cutting single words out of
longer recordings.

No audio is committed to this repository: ``fetch`` runs ``apt-get download NAME=VERSION``
into ``benchmarks/.cache/real-speech/`` (git-ignored) and unpacks it with ``dpkg-deb -x``
at ``make bench`` time; the only network used is Debian's package archive.

| package (pinned) | what | licence |
|---|---|---|
| ``klettres-data`` 4:22.12.3-1 | KDE KLettres: letters and syllables read by native speakers, 22 languages (one short call per file, 0.5-3 s) | GPL-2+ |
| ``codec2-examples`` 1.0.5-1 | Codec2 test speech: read sentences by several men and women (8 kHz), HF-radio speech (``cq_ref``, ``g3plx``, ``ve9qrp``: a voice through a radio) | LGPL-2.1 |
| ``pocketsphinx-testdata`` 0.8+5prealpha+1-15 | CMU Sphinx test data: commands, numbers, a LibriVox reading of *Sense and Sensibility* | BSD-2 |
| ``alsa-utils`` 1.2.8-1 | ``speaker-test`` voice prompts ("Front left", ...), one woman | GPL-2 |
| ``sound-icons`` 0.1-8 | instrument notes (trumpet, guitar, harpsichord): not speech, harmonic like a voice | GPL-2+ |

Left out: codec2 `david4.wav` and `vk2tpm_004.wav` are not speech (Silero 0.0, no words
recognised: data-modem signals).

Invariants:
- every package is fetched at exactly the version in ``PACKAGES``; a different version
  already in the cache is refused (``RealSpeechError``), never used;
- a source belongs to exactly one split; ``TUNING`` and ``HELD_OUT`` share no voice
  (sources from one package that may share a speaker are kept in one split; an
  ``overlap`` source mixes two voices of its own split only);
- ``load`` returns float32 mono at 16 kHz, peak-normalised to 0.5, leading and
  trailing near-silence (< -40 dB re peak, 10 ms frames) trimmed;
- reading is capped (``MAX_FILE_BYTES``) and file names are fixed in ``SOURCES``.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import numpy.typing as npt

log = logging.getLogger(__name__)

SR = 16_000
FRAME = 160
MAX_FILE_BYTES = 8 * 1024 * 1024
CACHE = Path(__file__).resolve().parent / ".cache" / "real-speech"

PACKAGES: dict[str, str] = {
    "klettres-data": "4:22.12.3-1",
    "codec2-examples": "1.0.5-1",
    "pocketsphinx-testdata": "0.8+5prealpha+1-15",
    "alsa-utils": "1.2.8-1",
    "sound-icons": "0.1-8",
}
LICENCES: dict[str, str] = {
    "klettres-data": "GPL-2+",
    "codec2-examples": "LGPL-2.1",
    "pocketsphinx-testdata": "BSD-2",
    "alsa-utils": "GPL-2",
    "sound-icons": "GPL-2+",
}

F32 = npt.NDArray[np.float32]


class RealSpeechError(RuntimeError):
    """A recording package could not be fetched or read."""


@dataclass(frozen=True)
class Source:
    """One voice (or one package's set of voices) and how the bench uses it.

    kind: ``calls`` (each file is one short word or syllable), ``sentences`` (each
    file is read speech; the bench also cuts single words out of it), ``radio``
    (speech through a radio: must be dropped), ``overlap`` (two talkers at once:
    ``files`` names two other sources of the same split, whose clips are mixed with
    the second starting 0.2-1.0 s after the first; must be dropped), ``lookalike``
    (not speech: may be kept).
    files: paths inside the unpacked package; ``*.raw`` files are 16-bit LE PCM at
    ``raw_rate``.
    """

    name: str
    package: str
    split: str
    kind: str
    language: str
    files: tuple[str, ...]
    raw_rate: int = 8000


_K = "usr/share/klettres"
_C = "usr/share/codec2"
_P = "usr/share/pocketsphinx/test/data"


def _klettres(lang: str, split: str) -> Source:
    return Source(f"klettres-{lang}", "klettres-data", split, "calls", lang, (f"{_K}/{lang}/*/*",))


_KLETTRES_TUNE = ("de", "fr", "es", "cs", "nl", "nb", "ar", "ru", "tn", "en")
_KLETTRES_HELD = ("it", "hu", "da", "lt", "en_GB", "pt_BR", "nds", "he", "uk", "ml")

SOURCES: tuple[Source, ...] = (
    *(_klettres(lang, "tune") for lang in _KLETTRES_TUNE),
    *(_klettres(lang, "held") for lang in _KLETTRES_HELD),
    # codec2: hts1a/hts2a/mmt1/morig/kristoff tune; the rest held out
    Source("codec2-hts", "codec2-examples", "tune", "sentences", "en",
           (f"{_C}/wav/hts1a.wav", f"{_C}/wav/hts2a.wav")),
    Source("codec2-mmt1", "codec2-examples", "tune", "sentences", "en", (f"{_C}/wav/mmt1.wav",)),
    Source("codec2-morig", "codec2-examples", "tune", "sentences", "en",
           (f"{_C}/wav/morig.wav",)),
    Source("codec2-kristoff", "codec2-examples", "tune", "sentences", "en",
           (f"{_C}/raw/kristoff.raw",)),
    Source("codec2-vk5qi", "codec2-examples", "tune", "radio", "en", (f"{_C}/wav/vk5qi.wav",)),
    Source("codec2-cq_ref", "codec2-examples", "tune", "radio", "en", (f"{_C}/raw/cq_ref.raw",)),
    Source("codec2-forig", "codec2-examples", "held", "sentences", "en",
           (f"{_C}/wav/forig.wav",)),
    Source("codec2-big_dog", "codec2-examples", "held", "sentences", "en",
           (f"{_C}/wav/big_dog.wav",)),
    Source("codec2-cross", "codec2-examples", "held", "sentences", "en",
           (f"{_C}/wav/cross.wav",)),
    Source("codec2-g3plx", "codec2-examples", "held", "radio", "en", (f"{_C}/raw/g3plx.raw",)),
    Source("codec2-ve9qrp", "codec2-examples", "held", "radio", "en",
           (f"{_C}/raw/ve9qrp_10s.raw",)),
    Source("codec2-orig16k", "codec2-examples", "held", "sentences", "en",
           (f"{_C}/raw/speech_orig_16k.wav",)),
    Source("sphinx-commands", "pocketsphinx-testdata", "tune", "sentences", "en",
           (f"{_P}/goforward.raw", f"{_P}/something.raw", f"{_P}/numbers.raw"), 16000),
    Source("sphinx-cards", "pocketsphinx-testdata", "tune", "sentences", "en",
           (f"{_P}/cards/*.wav",)),
    Source("sphinx-librivox", "pocketsphinx-testdata", "held", "sentences", "en",
           (f"{_P}/librivox/*.wav",)),
    Source("alsa-prompts", "alsa-utils", "held", "sentences", "en",
           tuple(f"usr/share/sounds/alsa/{s}.wav" for s in (
               "Front_Center", "Front_Left", "Front_Right", "Rear_Center", "Rear_Left",
               "Rear_Right", "Side_Left", "Side_Right"))),
    Source("instruments", "sound-icons", "tune", "lookalike", "-",
           ("usr/share/sounds/sound-icons/*.wav",)),
    # two talkers at once: a man and a woman of the tuning voices; two held-out voices
    Source("overlap-hts-cards", "-", "tune", "overlap", "en", ("codec2-hts", "sphinx-cards")),
    Source("overlap-forig-librivox", "-", "held", "overlap", "en",
           ("codec2-forig", "sphinx-librivox")),
)  # fmt: skip

TUNING = tuple(s for s in SOURCES if s.split == "tune")
HELD_OUT = tuple(s for s in SOURCES if s.split == "held")


def fetch(cache: Path = CACHE) -> Path:
    """Download and unpack every pinned package into ``cache`` (once); return ``cache``."""
    cache.mkdir(parents=True, exist_ok=True)
    for name, version in PACKAGES.items():
        stamp = cache / f"{name}.version"
        if stamp.exists():
            if stamp.read_text().strip() != version:
                raise RealSpeechError(f"{cache}: {name} unpacked at another version than {version}")
            continue
        with tempfile.TemporaryDirectory(dir=cache, prefix=".dl-") as tmp:
            apt = shutil.which("apt-get")
            dpkg = shutil.which("dpkg-deb")
            if not apt or not dpkg:
                raise RealSpeechError("apt-get and dpkg-deb are needed to fetch the recordings")
            proc = subprocess.run(
                [apt, "download", f"{name}={version}"],
                cwd=tmp, capture_output=True, text=True, timeout=600, check=False,
            )  # fmt: skip
            debs = list(Path(tmp).glob("*.deb"))
            if proc.returncode != 0 or len(debs) != 1:
                raise RealSpeechError(f"apt-get download {name}={version}: {proc.stderr[-400:]}")
            subprocess.run([dpkg, "-x", str(debs[0]), str(cache / name)], check=True, timeout=600)
        stamp.write_text(version + "\n")
        log.info("fetched %s %s (%s)", name, version, LICENCES[name])
    return cache


def source_files(src: Source, cache: Path = CACHE) -> list[Path]:
    root = cache / src.package
    out: list[Path] = []
    for pattern in src.files:
        found = sorted(p for p in root.glob(pattern) if p.is_file())
        out.extend(p for p in found if p.suffix.lower() in (".wav", ".ogg", ".raw", ".flac"))
    if not out:
        raise RealSpeechError(f"{src.name}: no files under {root} for {src.files}")
    return out


@lru_cache(maxsize=4096)
def load(path: Path, raw_rate: int = 8000) -> F32:
    """One recording as float32 mono 16 kHz, trimmed, peak 0.5 (see the invariants)."""
    import soundfile as sf
    from scipy.signal import resample_poly

    if path.stat().st_size > MAX_FILE_BYTES:
        raise RealSpeechError(f"{path} larger than {MAX_FILE_BYTES} bytes")
    if path.suffix == ".raw":
        x = np.frombuffer(path.read_bytes(), dtype="<i2").astype(np.float64) / 32768.0
        rate = raw_rate
    else:
        data, rate = sf.read(str(path), dtype="float64", always_2d=True)
        x = data.mean(axis=1)
    if rate != SR:
        g = int(np.gcd(rate, SR))
        x = resample_poly(x, SR // g, rate // g)
    x = x - float(np.mean(x)) if x.size else x
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    if peak <= 0:
        raise RealSpeechError(f"{path}: silent")
    rms = frame_rms(x)
    loud = np.flatnonzero(rms > rms.max() * 10 ** (-40 / 20))
    x = x[int(loud[0]) * FRAME : (int(loud[-1]) + 1) * FRAME]
    return np.asarray(x * (0.5 / peak), dtype=np.float32)


def frame_rms(x: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
    n = x.size // FRAME
    f = np.asarray(x[: n * FRAME], dtype=np.float64).reshape(n, FRAME)
    return np.asarray(np.sqrt(np.mean(f * f, axis=1) + 1e-20), dtype=np.float64)


def speech_mask(clip: npt.NDArray[np.floating]) -> npt.NDArray[np.bool_]:
    """Ground truth per 10 ms frame of a clip (conservative, as the scene generator's):
    RMS above -45 dB re the clip's loudest frame and above 3x its own noise floor (the
    10th percentile frame), so a recording's hiss between words is not speech."""
    rms = frame_rms(clip)
    if not rms.size:
        return np.zeros(0, dtype=np.bool_)
    thr = max(rms.max() * 10 ** (-45 / 20), 3.0 * float(np.percentile(rms, 10)))
    return np.asarray(rms > thr, dtype=np.bool_)


def cut_words(clip: F32, min_s: float = 0.12, max_s: float = 1.2) -> list[F32]:
    """Single words (or the shortest runs of speech) cut out of a longer recording by
    energy: runs of frames above a threshold re peak, joined over gaps < 40 ms, padded
    by 40 ms, with 10 ms fades, each peaking within 20 dB of the recording's loudest
    frame (quieter runs are breaths and clicks); the threshold is raised from -30 to -12 dB in 6 dB
    steps until a run is short enough, so words run together in fluent speech are
    split at their quietest joins."""
    rms = frame_rms(clip)
    out: list[F32] = []
    fade = np.linspace(0.0, 1.0, FRAME, dtype=np.float32)

    def runs(lo: int, hi: int, db: float) -> None:
        on = rms[lo:hi] > rms.max() * 10 ** (db / 20)
        spans: list[list[int]] = []
        for i in np.flatnonzero(on):
            if spans and i - spans[-1][1] <= 4:
                spans[-1][1] = int(i)
            else:
                spans.append([int(i), int(i)])
        for a, b in spans:
            n = b - a + 1
            if n > max_s * 100 and db < -12:
                runs(lo + a, lo + b + 1, db + 6)
                continue
            if not min_s * 100 <= n <= max_s * 100:
                continue
            if rms[lo + a : lo + b + 1].max() < rms.max() * 10 ** (-20 / 20):
                continue  # a breath or a click, not a word
            s0, s1 = max(0, (lo + a - 4) * FRAME), min(clip.size, (lo + b + 5) * FRAME)
            w = clip[s0:s1].copy()
            w[:FRAME] *= fade
            w[-FRAME:] *= fade[::-1]
            out.append(w)

    runs(0, rms.size, -30.0)
    return out


def clips(src: Source, cache: Path = CACHE) -> list[F32]:
    """Every recording of ``src``, loaded (see ``load``); for an ``overlap`` source,
    those of the first of its two sources (``overlap_partner`` gives the second)."""
    if src.kind == "overlap":
        return clips(BY_NAME[src.files[0]], cache)
    return [load(p, src.raw_rate) for p in source_files(src, cache)]


def overlap_partner(src: Source) -> Source:
    """The second talker of an ``overlap`` source."""
    return BY_NAME[src.files[1]]


BY_NAME: dict[str, Source] = {s.name: s for s in SOURCES}
