"""The replay buffer keeps its samples across a daemon restart, with the storage key
sealed by a real TPM (swtpm), also when the writer is SIGKILLed and the TPM restarts."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from devstack.procs import ProcessGroup
from devstack.swtpm import start_swtpm
from edge_daemon.buffer import ReplayBuffer
from edge_daemon.keys.tpm import TpmKeyStore

pytestmark = pytest.mark.integration

WRITER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from pathlib import Path
    from edge_daemon.buffer import ReplayBuffer
    from edge_daemon.keys.tpm import TpmKeyStore
    from fleet_protocol.batch import SampleMeta
    from fleet_protocol.features import N_BANDS, N_FRAMES
    tcti, state = sys.argv[1], Path(sys.argv[2])
    keys = TpmKeyStore(tcti, state / "keys")
    buf = ReplayBuffer(state / "buffer.sqlite3", keys.storage_key())
    for i in range(int(sys.argv[3])):
        meta = SampleMeta(sample_id=f"{i:032x}", captured_at_ms=i, stream_offset_s=float(i), predicted="horn", score=0.5, model_sha256="ab" * 32, reason="audit")
        buf.add(meta, np.full((N_BANDS, N_FRAMES), i, dtype=np.float16))
        print(i, flush=True)
    time.sleep(60)
    """
)


def test_buffer_keeps_committed_samples_after_sigkill_and_tpm_restart(tmp_path: Path) -> None:
    state = tmp_path / "device"
    with ProcessGroup(tmp_path / "logs") as procs:
        tpm = start_swtpm(procs, tmp_path / "tpm")
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, tpm.tcti, str(state), "25"],
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).parents[2],
        )
        assert writer.stdout is not None
        last = -1
        for line in writer.stdout:
            last = int(line)
            if last == 24:
                break
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait(10)
        procs.stop(tpm.child)
        tpm = start_swtpm(procs, tmp_path / "tpm")  # same state, new process and port
        with TpmKeyStore(tpm.tcti, state / "keys") as keys:
            buf = ReplayBuffer(state / "buffer.sqlite3", keys.storage_key())
            samples = buf.unbatched(100)
            buf.close()
    assert last == 24
    assert [m.sample_id for m, _ in samples] == [f"{i:032x}" for i in range(25)]
    assert all(float(f[0, 0]) == i for i, (_, f) in enumerate(samples))
    with sqlite3.connect(state / "buffer.sqlite3") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
