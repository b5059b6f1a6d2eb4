"""`make gpu-check` cannot rot: its reduced mode runs here, on the CPU, every time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_gpu_check_runs_in_its_reduced_cpu_mode():
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    out = subprocess.run([sys.executable, str(script), "--quick", "--device", "cpu"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    for heading in ("## 1. Extraction", "## 2. Out of memory", "## 3. Scoring", "## 4. cuEquivariance"):
        assert heading in text
    extraction = [line for line in text.splitlines() if line.startswith("| float")]
    assert len(extraction) == 8  # 2 dtypes x 2 sizes x 2 modes
    assert {line.split("|")[2].strip() for line in extraction} == {"latents only", "forces on"}
    assert all(float(line.split("|")[7].strip().rstrip("x")) > 0 for line in extraction)
    oom = next(line for line in text.splitlines() if line.startswith("| 2 | 2048"))
    cells = [c.strip() for c in oom.split("|")[1:-1]]
    assert cells[2] == "1" and int(cells[3]) >= 1 and cells[6] == "yes"  # batch 1, then domains, equal to CPU
