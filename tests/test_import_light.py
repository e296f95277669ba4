"""``import shusheng`` stays light (design.md, "Layers": ``shusheng/__init__.py`` is layer 1; style.md:
``import shusheng`` must not import Gradio, diffusers or FAISS). Checked in a fresh interpreter, since the
test session itself has imported much more by the time this runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("gradio", "diffusers", "faiss", "timm", "transformers", "ray")


def loaded_after(code: str, watched: tuple[str, ...]) -> list[str]:
    """Run ``code`` in a fresh interpreter in the checkout; return the ``watched`` modules it loaded."""
    probe = f"{code}\nimport sys\nprint(' '.join(sorted(m for m in {list(watched)!r} if m in sys.modules)))"
    res = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return (res.stdout.splitlines() or [""])[-1].split()


def test_import_shusheng_is_light() -> None:
    heavy = loaded_after("import shusheng", HEAVY)
    assert heavy == [], f"`import shusheng` imports {heavy}: import them where they are used"


def test_probe_sees_loaded_modules() -> None:
    # the probe can fail: a module that the code imports is reported, one that it does not is not
    assert loaded_after("import shusheng, wave", ("wave", "gradio")) == ["wave"]
    assert loaded_after("import shusheng", ("wave",)) == []
