"""The repository layout must not shadow the stdlib `platform` or the `mlflow` library."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_init_in_platform_or_mlflow() -> None:
    assert not (ROOT / "platform" / "__init__.py").exists()
    assert not (ROOT / "mlflow" / "__init__.py").exists()
    assert not list((ROOT / "mlflow").glob("*.py"))


def test_imports_from_repo_root_resolve_to_real_modules() -> None:
    code = (
        "import platform, mlflow, sys;"
        "assert platform.system(), 'stdlib platform';"
        "assert mlflow.__file__ is not None and 'site-packages' in mlflow.__file__, mlflow.__file__;"
        "import brainalign; print(platform.__file__, mlflow.__file__)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert str(ROOT / "platform") not in out.stdout.split()[0]


def test_import_brainalign_is_light() -> None:
    code = "import sys, brainalign; bad=[m for m in ('ray','mlflow','optuna','torch') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
