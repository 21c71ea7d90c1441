"""Optional test dependencies: skipped when absent on a developer's machine, a failure under CI.

CI installs every test dependency (TRL included), so a missing one there means a broken environment,
and a silently skipped reference test would hide it.
"""

import importlib
import os

import pytest


def import_or_skip(name: str):
    """`pytest.importorskip(name)`, except that under CI (env CI set and not false/0) it imports
    plainly, so a missing package fails the test loudly."""
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        return importlib.import_module(name)
    return pytest.importorskip(name)
