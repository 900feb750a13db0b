"""The privacy gate and its Silero VAD: streaming invariants, margins, leakage and yield.

The leakage/yield targets are measured against the scene generator's frame-level
speech ground truth (docs/adr/0005-privacy-gate.md has the long-run numbers).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from devstack.scene import sounds, speech
from devstack.scene.stream import Scene, SceneSpec, iter_blocks, render_scene
from edge_daemon.errors import ConfigError
from edge_daemon.privacy.gate import GateConfig, KeptWindow, PrivacyGate
from edge_daemon.privacy.vad import CHUNK_SAMPLES, SileroVad

SR = 16_000
F32 = npt.NDArray[np.float32]


@pytest.fixture(scope="module")
def vad() -> SileroVad:
    return SileroVad(threads=1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("speech-cache")


def _run(gate: PrivacyGate, blocks: list[F32]) -> list[KeptWindow]:
    kept: list[KeptWindow] = []
    for b in blocks:
        kept += gate.push(b)
    return kept + gate.flush()


def _measure(scene: Scene, kept: list[KeptWindow]) -> tuple[float, float]:
    """(leakage, yield): speech frames inside kept windows / all speech frames, and
    speech-free windows kept / speech-free windows."""
    n = len(scene.window_labels)
    frames = scene.speech_frames.reshape(n, 100)
    keep = np.zeros(n, dtype=bool)
    keep[[k.index for k in kept]] = True
    speech_free = ~frames.any(axis=1)
    leakage = frames[keep].sum() / max(1, frames.sum())
    return float(leakage), float((keep & speech_free).sum() / speech_free.sum())


# ------------------------------------------------------------------------------ VAD


def test_vad_loads_the_packaged_onnx_without_importing_silero_vad_or_torch() -> None:
    code = (
        "import sys\n"
        "from edge_daemon.privacy.vad import SileroVad\n"
        "v = SileroVad()\n"
        "assert v.model_path.name == 'silero_vad.onnx', v.model_path\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'silero_vad'))\n"
        "assert not bad, bad\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-2000:]


def test_vad_hears_espeak_speech_and_not_background(vad: SileroVad, cache: Path) -> None:
    clip = speech.speech_clip("it", np.random.default_rng(1), cache)
    bed = sounds.background(2 * SR, np.random.default_rng(1))
    vad.reset()
    assert float(vad.chunk_probs(clip).max()) > 0.9
    vad.reset()
    assert float(vad.chunk_probs(bed).max()) < 0.1


def test_vad_probabilities_do_not_depend_on_block_sizes(vad: SileroVad, cache: Path) -> None:
    clip = speech.speech_clip("nl", np.random.default_rng(2), cache)
    vad.reset()
    whole = np.concatenate((vad.chunk_probs(clip), vad.flush()))
    vad.reset()
    parts = [vad.chunk_probs(clip[i : i + 777]) for i in range(0, clip.size, 777)]
    pieces = np.concatenate([*parts, vad.flush()])
    assert whole.size == -(-clip.size // CHUNK_SAMPLES)
    assert np.array_equal(whole, pieces)


def test_batched_vad_streams_match_single_streams(vad: SileroVad, cache: Path) -> None:
    a = speech.speech_clip("pl", np.random.default_rng(3), cache)[: 3 * CHUNK_SAMPLES * 10]
    b = sounds.background(a.size, np.random.default_rng(3))
    vad.reset()
    single = vad.chunk_probs(a)
    pair = vad.spawn(streams=2)
    both = pair.chunk_probs(np.stack((a, b)))
    assert np.allclose(both[0], single, atol=1e-6)  # float rounding of a 2-row product
    pair.reset()
    other = pair.chunk_probs(np.stack((a, np.zeros_like(b))))
    assert np.array_equal(other[0], both[0])  # the other stream's samples never matter


def test_vad_rejects_oversized_and_misshapen_input(vad: SileroVad) -> None:
    with pytest.raises(ValueError):
        vad.chunk_probs(np.zeros(61 * SR, dtype=np.float32))
    with pytest.raises(ValueError):
        vad.chunk_probs(np.zeros((2, 512), dtype=np.float32))


# ----------------------------------------------------------------------------- gate


def test_gate_config_rejects_unsafe_values() -> None:
    for bad in (
        {"threshold": 0.0},
        {"hysteresis": 0.5},
        {"margin_after_s": -1.0},
        {"detectors": ()},
        {"detectors": ("level", "level")},
        {"detectors": ("psychic",)},
        {"declip_factor": 0.5},
    ):
        with pytest.raises(ConfigError):
            GateConfig(**bad)


def _bed_and_speech(clip: F32, start: int, seed: int) -> tuple[F32, F32]:
    bed = sounds.background(14 * SR, np.random.default_rng(seed))
    with_speech = bed.copy()
    with_speech[start : start + clip.size] += 0.3 * clip
    return bed, with_speech


def test_gate_drops_a_speech_free_window_when_speech_starts_in_its_after_margin(
    vad: SileroVad, cache: Path
) -> None:
    clip = speech.speech_clip("sv", np.random.default_rng(7), cache)
    start = int(3.3 * SR)  # window 2 ([2, 3) s) holds no speech; speech starts 0.3 s later
    bed, audio = _bed_and_speech(clip, start, 7)
    assert 2 in {k.index for k in _run(PrivacyGate(GateConfig(), vad), [bed])}
    gate = PrivacyGate(GateConfig(), vad)
    kept = {k.index for k in _run(gate, [audio])}
    assert 2 not in kept
    assert not kept & set(range(3, (start + clip.size - 1) // SR + 1))  # the speech itself
    assert 11 in kept
    assert gate.stats.windows_in == 14
    assert gate.stats.windows_dropped_unvetted == 1  # [13, 14): the 0.75 s margin cut
    s = gate.stats
    dropped = s.windows_dropped_speech + s.windows_dropped_unvetted + s.windows_dropped_check
    assert s.windows_dropped_warmup == 2  # [0, 2): the warm-up after the stream start
    assert s.windows_kept + dropped + s.windows_dropped_warmup == 14


def test_gate_drops_a_speech_free_window_when_speech_ends_in_its_before_margin(
    vad: SileroVad, cache: Path
) -> None:
    clip = speech.speech_clip("cs", np.random.default_rng(8), cache)
    end = int(7.8 * SR)  # window 8 ([8, 9) s) holds no speech; speech ended 0.2 s before
    bed, audio = _bed_and_speech(clip, end - clip.size, 8)
    assert 8 in {k.index for k in _run(PrivacyGate(GateConfig(), vad), [bed])}
    kept = {k.index for k in _run(PrivacyGate(GateConfig(), vad), [audio])}
    assert 8 not in kept
    assert not kept & set(range((end - clip.size) // SR, 8))
    assert 11 in kept


def test_kept_windows_do_not_depend_on_push_block_sizes(vad: SileroVad, cache: Path) -> None:
    scene = render_scene(SceneSpec(seed=21, duration_s=30, speech_rate=0.25), cache)
    reference = _run(PrivacyGate(GateConfig(), vad), [scene.audio])
    rng = np.random.default_rng(0)
    cuts = np.cumsum(rng.integers(1, 9_000, size=200))
    random_blocks = np.split(scene.audio, cuts[cuts < scene.audio.size])
    for blocks in (list(iter_blocks(scene, 160)), random_blocks):
        got = _run(PrivacyGate(GateConfig(), vad), blocks)
        assert [k.index for k in got] == [k.index for k in reference]
        assert all(np.array_equal(g.audio, r.audio) for g, r in zip(got, reference, strict=True))
    assert 0 < len(reference) < 30  # the scene has both outcomes


def test_kept_audio_is_the_input_unchanged(vad: SileroVad, cache: Path) -> None:
    scene = render_scene(SceneSpec(seed=22, duration_s=12, speech_rate=0.1), cache)
    kept = _run(PrivacyGate(GateConfig(), vad), list(iter_blocks(scene, 4_000)))
    assert kept
    for k in kept:
        assert k.start_sample == k.index * SR
        assert np.array_equal(k.audio, scene.audio[k.start_sample : k.start_sample + SR])


def test_flush_discards_the_partial_window_and_restarts_the_stream(vad: SileroVad) -> None:
    bed = sounds.background(int(4.5 * SR), np.random.default_rng(5))
    gate = PrivacyGate(GateConfig(), vad)
    first = _run(gate, [bed])
    # [0, 2): warm-up; [3, 4): after-margin cut; [4, 4.5): partial
    assert [k.index for k in first] == [2]
    second = _run(gate, [bed])  # a new stream: the warm-up again
    assert [k.index for k in second] == [2]
    assert all(np.array_equal(a.audio, b.audio) for a, b in zip(first, second, strict=True))


def test_flush_drops_windows_whose_after_margin_the_stream_end_cuts(
    vad: SileroVad, cache: Path
) -> None:
    """Speech that starts in the last ``margin_after_s`` of a file may not be detected
    yet; the windows before it are dropped, not released unvetted."""
    clip = speech.speech_clip("pt", np.random.default_rng(9), cache)
    bed = sounds.background(8 * SR, np.random.default_rng(9))
    audio = bed.copy()
    audio[int(7.8 * SR) :] += 0.3 * clip[: int(0.2 * SR)]  # 0.2 s of speech at the very end
    for stream in (bed, audio):
        gate = PrivacyGate(GateConfig(), vad)
        kept = {k.index for k in _run(gate, [stream])}
        last_vetted = int(8 - 1 - GateConfig().margin_after_s)  # its guard ends inside
        assert max(kept) <= last_vetted
        assert gate.stats.windows_dropped_unvetted == 7 - last_vetted


def test_denoise_stage_lowers_a_steady_masker_and_keeps_a_burst() -> None:
    from edge_daemon.privacy.gate import _Denoise

    t = np.arange(4 * SR) / SR
    hum = 0.1 * np.sin(2 * np.pi * 200 * t)  # a steady masker (a fan, an engine)
    audio = hum.copy()
    burst = slice(3 * SR, 3 * SR + 4000)
    audio[burst] += np.random.default_rng(4).standard_normal(4000) * 0.3  # comes and goes
    stage = _Denoise(GateConfig().denoise_over)
    hop = CHUNK_SAMPLES
    chunks = audio.reshape(-1, hop)  # (chunks, 512): the stage conditions rows of chunks
    out = np.concatenate([stage(chunks[i : i + 3]).reshape(-1) for i in range(0, len(chunks), 3)])
    out = out[stage.delay :]

    def rms(x: npt.NDArray[np.float64]) -> float:
        return float(np.sqrt(np.mean(x**2)))

    assert rms(out[2 * SR : 3 * SR - 1000]) < rms(hum) / 3  # the hum, >= 10 dB down
    assert rms(out[3 * SR + 1000 : 3 * SR + 3000]) > 0.7 * 0.3  # the burst mostly kept


def test_dereverb_stage_lowers_a_reverberant_tail_and_keeps_the_onset() -> None:
    from edge_daemon.privacy.gate import _Dereverb

    rng = np.random.default_rng(6)
    dry = np.zeros(94 * CHUNK_SAMPLES)  # about 3 s, whole chunks
    dry[SR : SR + 3200] = rng.standard_normal(3200) * 0.3  # a 0.2 s burst
    t = np.arange(int(0.8 * SR)) / SR
    rir = rng.standard_normal(t.size) * np.exp(-6.9 * t / 0.8) * 0.05  # RT60 0.8 s tail
    rir[0] = 1.0
    wet = np.convolve(dry, rir)[: dry.size]
    stage = _Dereverb(GateConfig().denoise_over)
    chunks = wet.reshape(-1, CHUNK_SAMPLES)
    out = np.concatenate([stage(chunks[i : i + 4]).reshape(-1) for i in range(0, len(chunks), 4)])
    out = out[stage.delay :]

    def rms(x: npt.NDArray[np.float64]) -> float:
        return float(np.sqrt(np.mean(x**2)))

    tail = slice(SR + 3200 + 1600, SR + 3200 + 6400)  # 0.1-0.4 s after the burst ends
    assert rms(out[tail]) < rms(wet[tail]) / 2  # the late reverberation, >= 6 dB down
    onset = slice(SR + 200, SR + 1600)
    assert rms(out[onset]) > 0.7 * rms(wet[onset])  # the direct sound mostly kept


def test_twin_vad_states_restart_in_turn_and_the_older_one_decides() -> None:
    from edge_daemon.privacy.gate import twin_schedule

    period = 64  # twin A restarts at 64, 128...; twin B at 32, 96...
    plan = [twin_schedule(i, period) for i in range(200)]
    assert [i for i, p in enumerate(plan) if p[0]] == [64, 128, 192]
    assert [i for i, p in enumerate(plan) if p[1]] == [32, 96, 160]
    deciding = ["A" if p[2] else "B" for p in plan]
    assert deciding[:64] == ["A"] * 64  # both fresh at stream start; then A is older
    assert deciding[64:96] == ["B"] * 32 and deciding[96:128] == ["A"] * 32
    ages = [
        i - max((r for r in range(i + 1) if plan[r][0 if d == "A" else 1]), default=0)
        for i, d in enumerate(deciding)
    ]
    assert max(ages[32:]) < period and min(ages[64:]) >= period // 2


def test_restarted_vad_states_hear_speech_a_long_running_state_misses(cache: Path) -> None:
    """Speech at 0 dB under construction noise, 112 s into a scene (privacy bench seed):
    a VAD state that has run through the whole scene scores it < 0.15; the gate's
    twin states, at most 10 s old, catch it (ADR 0005)."""
    from benchmarks.privacy import BASE_SEED, LANGUAGES_INDEX

    spec = SceneSpec(
        seed=BASE_SEED + 1000 * LANGUAGES_INDEX["pt"] + 11,
        duration_s=120,
        speech_rate=0.1,
        speech_snr_db=(0.0, 0.0),
        languages=("pt",),
    )
    scene = render_scene(spec, cache)
    vad = SileroVad(threads=1)
    leaked = {}
    for reset_s in (0.0, 10.0):
        blocks = list(iter_blocks(scene, SR))
        config = GateConfig(  # the single-view gate of ADR 0005's second decision
            vad_reset_s=reset_s, detectors=("denoise",), vad_states="twin",
            speech_check=False, margin_after_s=1.25,
        )  # fmt: skip
        kept = _run(PrivacyGate(config, vad), blocks)
        mask = np.zeros(scene.speech_frames.size, dtype=bool)
        for k in kept:
            mask[k.start_sample // 160 : k.start_sample // 160 + 100] = True
        leaked[reset_s] = int((mask & scene.speech_frames).sum())
    assert leaked[0.0] > 100  # a whole utterance
    assert leaked[10.0] == 0


def test_gate_rejects_oversized_or_multichannel_blocks(vad: SileroVad) -> None:
    gate = PrivacyGate(GateConfig(max_block_samples=SR), vad)
    with pytest.raises(ValueError):
        gate.push(np.zeros(SR + 1, dtype=np.float32))
    with pytest.raises(ValueError):
        gate.push(np.zeros((2, 100), dtype=np.float32))


@pytest.mark.parametrize("snr_db", [0.0, 5.0, 10.0, 15.0, 20.0])
def test_leakage_is_at_most_one_per_mille_at_every_snr(
    snr_db: float, vad: SileroVad, cache: Path
) -> None:
    spec = SceneSpec(
        seed=900 + int(snr_db), duration_s=90, speech_rate=0.1, speech_snr_db=(snr_db, snr_db)
    )
    scene = render_scene(spec, cache)
    leakage, _ = _measure(
        scene, _run(PrivacyGate(GateConfig(), vad), list(iter_blocks(scene, 1_600)))
    )
    assert scene.speech_frames.sum() > 500
    assert leakage <= 0.001


def test_yield_at_10_db_of_the_vad_and_of_both_detectors(vad: SileroVad, cache: Path) -> None:
    """Speech-free windows kept on one 4-minute scene at 10 dB. The VAD alone keeps
    0.859 (revision 3 kept 0.911: the voting states and the warm-up trade yield for
    leakage on real voices, ADR 0005 revision 4); with the speech check 0.838 (0.785
    with the check of revision 4; ADR 0005 revision 5). The
    issue's goal (0.85 of non-speech frames over 12 languages, `privacy.yield_10db`)
    is not met with both; these floors guard against further loss."""
    # 4 minutes: over 2 minutes the yield still swings by +-0.05 with the speech layout
    spec = SceneSpec(seed=1010, duration_s=240, speech_rate=0.1, speech_snr_db=(10.0, 10.0))
    scene = render_scene(spec, cache)
    blocks = list(iter_blocks(scene, 48_000))
    for config, floor in ((GateConfig(speech_check=False), 0.85), (GateConfig(), 0.78)):
        leakage, kept_share = _measure(scene, _run(PrivacyGate(config, vad), blocks))
        assert leakage <= 0.001
        assert kept_share >= floor, (config.speech_check, kept_share)
