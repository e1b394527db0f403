"""The Ray executor's modules: importing any of them imports no ``ray``, and the names other code
imports from :mod:`explainer.compute.ray_executor` are still there. Needs no cluster and no Ray.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_importing_the_ray_modules_imports_no_ray():
    code = (
        "import sys\n"
        "from explainer.compute.ray_executor import LOCAL, RayExecutor, SessionActor\n"
        "import explainer.compute.ray_actor as actor, explainer.compute.ray_connect as connect\n"
        "import explainer.compute.ray_dispatch as dispatch\n"
        "assert LOCAL == connect.LOCAL == 'local' and SessionActor is actor.SessionActor\n"
        "assert issubclass(RayExecutor, dispatch.Dispatcher)\n"
        "print('ray' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
