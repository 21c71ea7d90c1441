"""Every module imports on its own, and importing a loss does not pull in models, data or kernels."""

import importlib
import pkgutil
import subprocess
import sys

import pytest

import posttrain

MODULES = sorted(m.name for m in pkgutil.walk_packages(posttrain.__path__, "posttrain."))


@pytest.mark.parametrize("name", MODULES)
def test_module_imports(name):
    importlib.import_module(name)


def test_importing_a_loss_stays_light():
    code = (
        "import sys; import posttrain.losses.sft, posttrain.losses.registry; "
        "heavy = [m for m in ('transformers', 'datasets', 'triton', 'posttrain.kernels', 'posttrain.data') "
        "if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
