"""Scene streams with espeak-ng speech: determinism, ground-truth shapes, speech cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from devstack.errors import ToolMissingError
from devstack.scene import speech
from devstack.scene.stream import FRAME, Scene, SceneSpec, iter_blocks, render_scene
from fleet_protocol.features import SAMPLE_RATE
from fleet_protocol.labels import CLASSES


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("speech-cache")


@pytest.fixture(scope="module")
def scene(cache: Path) -> Scene:
    return render_scene(SceneSpec(seed=11, duration_s=40, speech_rate=0.2), cache)


def test_equal_specs_render_identical_scenes_and_other_seeds_differ(
    cache: Path, scene: Scene
) -> None:
    again = render_scene(SceneSpec(seed=11, duration_s=40, speech_rate=0.2), cache)
    other = render_scene(SceneSpec(seed=12, duration_s=40, speech_rate=0.2), cache)
    assert np.array_equal(scene.audio, again.audio)
    assert np.array_equal(scene.speech_frames, again.speech_frames)
    assert scene.window_labels == again.window_labels
    assert not np.array_equal(scene.audio, other.audio)


def test_render_is_the_same_with_a_cold_speech_cache(scene: Scene, tmp_path: Path) -> None:
    cold = render_scene(SceneSpec(seed=11, duration_s=40, speech_rate=0.2), tmp_path)
    assert np.array_equal(scene.audio, cold.audio)


def test_scene_arrays_have_the_documented_shapes_and_types(scene: Scene) -> None:
    assert scene.audio.dtype == np.float32 and scene.audio.shape == (40 * SAMPLE_RATE,)
    assert scene.speech_track.dtype == np.float32 and scene.speech_track.shape == (40 * 16000,)
    assert scene.speech_frames.dtype == np.bool_ and scene.speech_frames.shape == (40 * 100,)
    assert len(scene.window_labels) == 40
    assert set(scene.window_labels) <= set(CLASSES)
    assert float(np.max(np.abs(scene.audio))) <= 0.99 + 1e-6


def test_speech_frames_are_where_the_speech_track_is_not_silent(scene: Scene) -> None:
    frame_rms = np.sqrt(np.mean(scene.speech_track.reshape(-1, FRAME).astype(np.float64) ** 2, 1))
    assert scene.speech_frames.any()
    assert np.all(frame_rms[scene.speech_frames] > 0)  # never speech where the track is zero
    assert np.all(~scene.speech_frames[frame_rms == 0])
    windows = scene.speech_windows()
    assert windows.shape == (40,)
    assert np.array_equal(windows, scene.speech_frames.reshape(40, 100).any(axis=1))


def test_speech_fraction_follows_speech_rate(cache: Path) -> None:
    quiet = render_scene(SceneSpec(seed=5, duration_s=60, speech_rate=0.0), cache)
    chatty = render_scene(SceneSpec(seed=5, duration_s=60, speech_rate=0.3), cache)
    assert not quiet.speech_frames.any() and not quiet.speech_track.any()
    assert 0.12 < float(chatty.speech_frames.mean()) < 0.45


def _speech_over_scene_db(scene: Scene) -> float:
    on = np.repeat(scene.speech_frames, FRAME)
    track = scene.speech_track[on].astype(np.float64)
    under = scene.audio[on].astype(np.float64) - track
    return float(20 * np.log10(np.sqrt(np.mean(track**2)) / np.sqrt(np.mean(under**2))))


def test_speech_level_is_set_by_snr_against_the_scene_under_it(cache: Path) -> None:
    loud = render_scene(SceneSpec(seed=8, duration_s=30, speech_snr_db=(20.0, 20.0)), cache)
    soft = render_scene(SceneSpec(seed=8, duration_s=30, speech_snr_db=(0.0, 0.0)), cache)
    assert np.array_equal(loud.speech_frames, soft.speech_frames)  # same placement
    gap = _speech_over_scene_db(loud) - _speech_over_scene_db(soft)
    assert gap == pytest.approx(20.0, abs=0.1)
    assert -3.0 < _speech_over_scene_db(soft) < 6.0  # active level vs scene RMS, ~0 dB


def test_iter_blocks_covers_the_audio_in_order(scene: Scene) -> None:
    blocks = list(iter_blocks(scene, 7_000))
    assert all(b.size == 7_000 for b in blocks[:-1]) and 0 < blocks[-1].size <= 7_000
    assert np.array_equal(np.concatenate(blocks), scene.audio)
    with pytest.raises(ValueError):
        next(iter_blocks(scene, 0))


def test_bad_specs_are_rejected() -> None:
    with pytest.raises(ValueError):
        SceneSpec(seed=1, duration_s=0)
    with pytest.raises(ValueError):
        SceneSpec(seed=1, duration_s=5, speech_rate=1.0)
    with pytest.raises(ValueError):
        SceneSpec(seed=1, duration_s=5, speech_snr_db=(10.0, 0.0))
    with pytest.raises(ValueError):
        SceneSpec(seed=1, duration_s=5, class_weights=(("jazz", 1.0),))


@pytest.mark.parametrize("lang", speech.LANGUAGES)
def test_speech_clip_is_nonempty_16k_float32_in_every_language(lang: str, cache: Path) -> None:
    clip = speech.speech_clip(lang, np.random.default_rng(0), cache)
    assert clip.dtype == np.float32 and clip.ndim == 1
    assert 0.5 * SAMPLE_RATE < clip.size < 8 * SAMPLE_RATE
    assert float(np.max(np.abs(clip))) == pytest.approx(speech.PEAK, rel=1e-3)


def test_speech_clip_is_cached_on_disk_and_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = speech.speech_clip("de", np.random.default_rng(3), tmp_path)
    assert len(list(tmp_path.glob("*.npy"))) == 1

    def no_espeak(*args: object) -> None:
        raise AssertionError("espeak-ng ran although the clip was cached")

    monkeypatch.setattr(speech, "render", no_espeak)
    second = speech.speech_clip("de", np.random.default_rng(3), tmp_path)
    assert np.array_equal(first, second)


def test_corrupt_cache_entry_is_rendered_again(tmp_path: Path) -> None:
    first = speech.speech_clip("fr", np.random.default_rng(4), tmp_path)
    (entry,) = tmp_path.glob("*.npy")
    entry.write_bytes(b"not numpy")
    assert np.array_equal(speech.speech_clip("fr", np.random.default_rng(4), tmp_path), first)


def test_missing_espeak_raises_tool_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("devstack.procs.shutil.which", lambda *a, **k: None)
    speech.espeak_version.cache_clear()
    try:
        with pytest.raises(ToolMissingError):
            speech.speech_clip("en", np.random.default_rng(0), tmp_path)
    finally:
        speech.espeak_version.cache_clear()


def test_unknown_language_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        speech.speech_clip("tlh", np.random.default_rng(0), tmp_path)
