"""The distribution: its dependencies, and a core package that does not pull in the examples' libraries."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_core_dependencies_and_extras():
    # From the installed distribution's metadata (tomllib is not in Python 3.10).
    requirements = metadata.requires("lightning-twophase") or []

    def names(extra: str | None) -> set[str]:
        chosen = [
            r for r in requirements if ("extra ==" in r) == (extra is not None) and (extra is None or f'"{extra}"' in r)
        ]
        return {re.split(r"[<>=!~ ;\[]", r, maxsplit=1)[0].lower() for r in chosen}

    assert names(None) == {"torch", "lightning", "tensorboard"}
    assert {"torchvision", "torchmetrics", "matplotlib", "scikit-learn"} <= names("examples")
    assert {"pytest", "ruff"} <= names("dev")


def test_importing_the_core_package_loads_no_example_library():
    # Lightning itself loads some of them when they are installed (torchmetrics, and torchvision and matplotlib
    # through its optional integrations); what matters is what importing lightning_twophase adds on top.
    code = (
        "import sys, lightning.pytorch\n"
        "before = set(sys.modules)\n"
        "import lightning_twophase\n"
        "from lightning_twophase import ConvexitySwapCallback, ConjugateGradient\n"
        "added = {name.split('.')[0] for name in set(sys.modules) - before}\n"
        "print(sorted(added & {'torchvision', 'torchmetrics', 'matplotlib', 'sklearn', 'example_modules'}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert result.stdout.strip() == "[]"


def test_core_modules_import_the_optional_libraries_only_inside_functions():
    """matplotlib (figures) and torchmetrics (metric states) are imported lazily; torchvision never."""
    import ast

    optional = {"torchvision", "torchmetrics", "matplotlib", "sklearn", "example_modules"}
    for path in (ROOT / "lightning_twophase").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in optional, f"{path.name} imports {name} at module level"
