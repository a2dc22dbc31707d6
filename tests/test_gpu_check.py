"""bench/gpu_check.py runs without Ray (the GPU machine has none): here on the CPU with gloo."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Ray is made unimportable, as on the GPU machine.
WITHOUT_RAY = ("import runpy, sys; sys.modules['ray'] = None; sys.argv = ['gpu_check.py'] + sys.argv[1:]; "
               "runpy.run_path('bench/gpu_check.py', run_name='__main__')")


def test_the_gpu_check_trains_agrees_and_times_the_snapshot_without_ray():
    result = subprocess.run([sys.executable, "-c", WITHOUT_RAY, "--device", "cpu", "--model", "tiny", "--steps", "3",
                             "--batch", "16", "--micro-batch", "8", "--state-gb", "0.01"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["backend"] == "gloo"
    assert figures["loss_last"] < figures["loss_first"]
    assert figures["state_gb"] > 0.01 and 0 < figures["snapshot_stall_s"] and 0 < figures["torch_save_s"]
