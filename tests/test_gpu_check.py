"""scripts/gpu_check.sh on a machine without a GPU: one line saying so, exit 1, nothing built or written."""
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present: the script would run the GPU check")
def test_without_a_gpu_one_line_and_exit_1():
    before = (ROOT / "bench" / "RESULTS-gpu.md").read_text()
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("gpu_check: no CUDA GPU"), done.stderr
    assert (ROOT / "bench" / "RESULTS-gpu.md").read_text() == before
