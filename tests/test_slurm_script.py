"""launch/slurm.sbatch without a SLURM cluster: fake ``scontrol`` and ``srun`` on PATH record what it runs."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

FAKE_SCONTROL = """#!/usr/bin/env bash
echo "scontrol $*" >> "$RECORD"
[[ "$1 $2" == "show hostnames" ]] && printf 'gpu-a17\\ngpu-b03\\n'
exit 0
"""

# Records its arguments and the environment the per-node scripts would inherit, then exits with FAKE_STATUS.
FAKE_SRUN = """#!/usr/bin/env bash
{ echo "srun $*"; echo "HOSTFILE=$HOSTFILE"; echo "MASTER_ADDR=$MASTER_ADDR"; echo "MASTER_PORT=$MASTER_PORT"; } >> "$RECORD"
exit "$FAKE_STATUS"
"""


def run_sbatch(tmp_path: Path, status: int) -> tuple[subprocess.CompletedProcess, list[str], Path]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    record = tmp_path / "record.txt"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "RECORD": str(record),
           "FAKE_STATUS": str(status), "SLURM_SUBMIT_DIR": str(REPO), "SLURM_JOB_NODELIST": "gpu-a17,gpu-b03",
           "SLURM_JOB_ID": f"test{os.getpid()}", "GPUS_PER_NODE": "4", "MASTER_PORT": "29611"}
    result = subprocess.run(["bash", str(REPO / "launch" / "slurm.sbatch"), "llama-60m", "--data", "/d", "--output-dir",
                             "/shared/run"], env=env, capture_output=True, text=True, timeout=60)
    hostfile = REPO / f"slurm-hostfile-test{os.getpid()}"
    return result, record.read_text().splitlines(), hostfile


@pytest.mark.parametrize("status", [0, 130])
def test_one_launcher_per_node_from_the_slurm_environment(tmp_path, status):
    """The hostfile lists SLURM's nodes with GPUS_PER_NODE slots, MASTER_ADDR is the first of them, srun starts one
    per-node launch script per node with --resume auto appended, and the srun status is the job's. A run stopped by a
    signal (130: the time-limit warning or preemption) requeues the job; a finished one does not."""
    result, record, hostfile = run_sbatch(tmp_path, status)
    try:
        assert hostfile.read_text() == "gpu-a17 slots=4\ngpu-b03 slots=4\n"
    finally:
        hostfile.unlink(missing_ok=True)
    assert result.returncode == status, result.stderr
    srun = next(line for line in record if line.startswith("srun "))
    assert "--ntasks-per-node=1" in srun and 'NODE_RANK="$SLURM_NODEID"' in srun
    assert srun.endswith(f"{REPO} llama-60m --data /d --output-dir /shared/run --resume auto")
    assert f"HOSTFILE={hostfile}" in record and "MASTER_ADDR=gpu-a17" in record and "MASTER_PORT=29611" in record
    requeued = [line for line in record if line.startswith("scontrol requeue")]
    assert requeued == ([f"scontrol requeue test{os.getpid()}"] if status == 130 else [])
