"""The agent never needs root (issue 6): it runs end to end as ``nobody``.

It binds no port, loads nothing outside its configuration's paths and writes
only its state directory and its sinks' files. The test drops to uid/gid 65534
with ``setpriv`` and runs ``python -m agent run`` over the file source; where
the tests themselves are not root there is nothing to drop, and where
``nobody`` cannot read this checkout (a 0700 clone directory) the test says so
and skips.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                reason="needs root (to drop privileges) and setpriv")


def test_agent_runs_as_nobody() -> None:
    probe = subprocess.run([*NOBODY, sys.executable, "-c", "import agent.cli"], cwd=ROOT, capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"uid 65534 cannot read this checkout or its venv ({ROOT}): {probe.stderr[-200:]!r}")
    work = Path(tempfile.mkdtemp(prefix="inferwatch-nobody-"))
    try:
        work.chmod(0o777)  # the one directory the unprivileged agent may write
        records = work / "inference.jsonl"
        records.write_text("".join(json.dumps({"id": f"r{i}", "ts": 1763877600 + i * 0.01, "model": "m",
                                               "client_id": "flood" if i % 2 else f"t{i % 7}",
                                               "input": [0.1, 0.2, 0.3], "output": {"probs": [0.3, 0.7]}}) + "\n"
                                   for i in range(3000)))
        cfg = work / "agent.yaml"
        cfg.write_text(f"""
source: {{type: file, inference_path: {records}}}
artifacts: {work}/artifacts
state: {{dir: {work}/state}}
detectors:
  query_rate: {{window_s: 30, max_queries: 500}}
sinks:
  - {{type: jsonl, path: {work}/out/findings.jsonl}}
""")
        res = subprocess.run([*NOBODY, sys.executable, "-m", "agent", "run", "-c", str(cfg), "--until-idle", "0.5"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr[-3000:]
        findings = (work / "out/findings.jsonl").read_text().splitlines()
        assert findings and all(json.loads(f)["finding_info"]["uid"] for f in findings)
        assert (work / "state/checkpoint.npz").stat().st_uid == 65534  # written by the unprivileged agent
    finally:
        shutil.rmtree(work, ignore_errors=True)
