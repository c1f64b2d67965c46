"""benchmarks/gpu_suite.sh, the script for a lent GPU, runs end to end in its CPU rehearsal (--tiny)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_rehearsal_writes_every_result(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(["bash", "benchmarks/gpu_suite.sh", "--tiny", str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for name in ("metanet_throughput_cpu.json", "capture_cpu.json", "lopt_step_cpu.json", "metanet_scaling_cpu.json"):
        assert json.loads((tmp_path / name).read_text()), name
    throughput = json.loads((tmp_path / "metanet_throughput_cpu.json").read_text())
    assert set(throughput["cases"]) == {"gradmetanet-b128", "dws-inr"}
    assert all(c["median_s"] > 0 and c["gflop"] > 0 for c in throughput["cases"].values())
    results = json.loads((tmp_path / "curvature-gmnpp" / "results.json").read_text())
    assert "gradmetanet++" in results["models"] and results["provenance"]["device"] == "cpu"
    scaling = json.loads((tmp_path / "metanet_scaling_cpu.json").read_text())
    assert set(scaling["exponents"]["gradmetanet++"]) == {"b", "n_neurons", "depth"}
    assert (tmp_path / "suite.log").read_text().count("exit 0") == 5
