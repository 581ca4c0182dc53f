"""Status and metrics: `scsi-target status --json` counters move with I/O, and
the Prometheus endpoint serves them."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.request

from rawiscsi import RawInitiator
from targetproc import IQN, Target


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status(data_dir: str) -> dict:
    p = subprocess.run([sys.executable, "-m", "scsi_target", "status", "--data-dir", data_dir, "--json"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_status_counters_and_prometheus():
    port = free_port()
    with Target("--lun", "ram:16MiB", "--metrics", f"127.0.0.1:{port}") as t:
        before = status(t.data_dir)
        assert before["luns"][0]["commands"] == 0 and before["front_ends"][0]["kind"] == "iscsi"
        host, p = t.portal.rsplit(":", 1)
        ini = RawInitiator(host, int(p), initiator="iqn.2026-11.org.test:metrics")
        ini.login(IQN)
        for lba in range(0, 64, 8):
            ini.write16(lba, bytes([lba]) * 4096)
        for lba in range(0, 64, 8):
            assert ini.read16(lba, 8) == bytes([lba]) * 4096
        status_, sense, _ = ini.command(bytes([0x28, 0, 0xFF, 0xFF, 0xFF, 0xF0, 0, 0, 1, 0]), 0, read=512)
        assert status_ == 2     # LBA out of range: an error
        after = status(t.data_dir)
        lun = after["luns"][0]
        assert lun["commands"] >= 17 and lun["write_bytes"] == 8 * 4096 and lun["read_bytes"] == 8 * 4096
        assert lun["errors"] >= 1 and lun["in_flight"] == 0 and lun["latency_us"]["p50"] > 0
        sess = [s for s in after["sessions"] if s["initiator"].startswith("iqn.2026-11.org.test:metrics")]
        assert sess and sess[0]["write_bytes"] == 8 * 4096
        assert after["front_ends"][0]["read_bytes"] == 8 * 4096

        table = subprocess.run([sys.executable, "-m", "scsi_target", "status", "--data-dir", t.data_dir],
                               capture_output=True, text=True, timeout=60).stdout
        assert "LUNs" in table and "Sessions" in table and "32.0KiB" in table

        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert f'scsi_target_lun_write_bytes_total{{lun="0",target="{IQN}"}} 32768.0' in text
        assert f'scsi_target_lun_read_bytes_total{{lun="0",target="{IQN}"}} 32768.0' in text
        assert "scsi_target_session_commands_total" in text
        assert 'scsi_target_front_end_latency_seconds{front_end=' in text
        ini.close()
