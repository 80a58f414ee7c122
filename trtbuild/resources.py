"""Files trtbuild ships as package data, found through importlib.resources so a wheel install works."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

TEMPLATE_ROOT = Path(str(importlib.resources.files("trtbuild") / "templates"))
DATA_DIR = Path(str(importlib.resources.files("trtbuild") / "data"))
# The package the generated repository carries: the engine and the Python-backend models Triton runs.
RUNTIME_PACKAGE = Path(str(importlib.resources.files("trtbuild_runtime")))
