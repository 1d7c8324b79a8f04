"""The framework-free packages import with Lightning made unimportable (in a fresh interpreter)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

_SCRIPT = """
import sys

class _NoLightning:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("lightning", "pytorch_lightning", "lightning_fabric"):
            raise ImportError(f"{name} is blocked for this test")
        return None

sys.meta_path.insert(0, _NoLightning())
import thetascope
for mod in ("functional", "metrics", "capture", "monitors", "schedules", "keys", "_validation",
            "monitors.gradient", "monitors.temperature", "monitors.attention", "capture.introspect"):
    __import__("thetascope." + mod)
from thetascope import AttentionMonitor, AttentionProbe, GradientFlowCore, SpikeDetector
from thetascope import GradientFlow, TemperatureController, TemperatureSchedule, register_adapter
from thetascope.monitors import GradientFlowCore as G2
assert G2 is GradientFlowCore
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("lightning", "pytorch_lightning"))
assert not loaded, loaded
print("ok")
"""


def test_framework_free_packages_import_without_lightning() -> None:
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
