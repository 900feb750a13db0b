"""Edge (numpy) and training (torch) upload features agree to 1e-4.

The device computes features with ``fleet_protocol.features``; training computes them
with ``cloud_sidecar.features_torch``. A model is only valid on the device if both give
the same numbers, so the bound is on the max absolute difference of the normalised
features, over random audio, scene audio, silence and full-scale clipping.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cloud_sidecar.features_torch import FEATURE_VERSION, UploadFeatures, features_batch
from devstack.scene.stream import SceneSpec, render_scene
from fleet_protocol import features as F

TOL = 1e-4


def _max_diff(audio: np.ndarray) -> float:
    edge = F.features_batch(audio.astype(np.float32))
    train = features_batch(torch.from_numpy(audio.astype(np.float32))).numpy()
    assert train.shape == edge.shape == (audio.shape[0], F.N_BANDS, F.N_FRAMES)
    assert train.dtype == np.float32
    return float(np.max(np.abs(edge - train)))


def test_torch_features_match_edge_features_on_random_audio_to_1e_4() -> None:
    rng = np.random.default_rng(0)
    gains = np.array([1e-4, 1e-2, 0.1, 0.5, 1.0])[:, None]
    audio = np.clip(rng.standard_normal((5, F.WINDOW_SAMPLES)) * gains, -1.0, 1.0)
    assert _max_diff(audio) <= TOL


def test_torch_features_match_edge_features_on_scene_audio_to_1e_4() -> None:
    scene = render_scene(SceneSpec(seed=3, duration_s=12, speech_rate=0.0))
    audio = scene.audio.reshape(-1, F.WINDOW_SAMPLES)
    assert _max_diff(audio) <= TOL


def test_torch_features_match_edge_features_on_silence_and_full_scale() -> None:
    t = np.arange(F.WINDOW_SAMPLES) / F.SAMPLE_RATE
    audio = np.stack(
        [
            np.zeros(F.WINDOW_SAMPLES),
            np.sign(np.sin(2 * np.pi * 440 * t)),  # full-scale square wave
            0.99 * np.sin(2 * np.pi * 7900 * t),  # near Nyquist
        ]
    )
    assert _max_diff(audio) <= TOL


def test_torch_features_are_differentiable_and_share_the_feature_version() -> None:
    x = torch.zeros((2, F.WINDOW_SAMPLES), requires_grad=True)
    UploadFeatures()(x + 0.01 * torch.randn_like(x)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert FEATURE_VERSION == F.FEATURE_VERSION


def test_torch_features_reject_a_wrong_window_length() -> None:
    with pytest.raises(ValueError, match="expected"):
        features_batch(torch.zeros((1, F.WINDOW_SAMPLES - 1)))


def test_every_third_octave_band_holds_at_least_one_fft_bin() -> None:
    fb = F.band_filterbank()
    assert fb.shape == (F.N_BANDS, F.N_FFT // 2 + 1)
    assert (fb.sum(axis=1) >= 1).all()
    assert (fb.sum(axis=0) <= 1).all()  # bands do not overlap


def test_upload_features_equal_the_benchmarks_third_octave_120_ms_candidate() -> None:
    from benchmarks.representations import BY_NAME

    rng = np.random.default_rng(1)
    audio = (0.1 * rng.standard_normal((3, F.WINDOW_SAMPLES))).astype(np.float32)
    assert np.array_equal(F.features_batch(audio), BY_NAME["third-120ms"](audio))
    assert F.FRAME_MS == 120 and F.features_batch(audio).shape[1:] == (20, 8)
