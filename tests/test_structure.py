"""The package's shape: sizes and layered imports (scripts/check_structure.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import check_structure


def test_the_package_keeps_its_sizes_and_layers():
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "check_structure.py")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "structure ok" in result.stdout


def _package(root: Path, files: dict[str, str]) -> Path:
    package = root / "emoprompt"
    for name, text in {"__init__.py": "", **files}.items():
        path = package / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    return package


def test_the_check_finds_upward_imports_cycles_and_long_code(tmp_path):
    long_body = "\n".join(f"    x{i} = {i}" for i in range(check_structure.MAX_FUNCTION_LINES))
    package = _package(
        tmp_path,
        {
            "data/__init__.py": "",
            "data/splits.py": "from emoprompt.evaluation.runner import run\n",
            "evaluation/__init__.py": "",
            "evaluation/runner.py": "from emoprompt.evaluation.job import go\ndef run(): ...\n",
            "evaluation/job.py": "from emoprompt.evaluation import runner\ndef go(): ...\n",
            "labels.py": f"def long():\n{long_body}\n",
            "oddity.py": "",
        },
    )
    problems = "\n".join(check_structure.check(package))
    assert "emoprompt.data.splits (layer 1) imports emoprompt.evaluation.runner" in problems
    cycle = next(line for line in problems.splitlines() if line.startswith("import cycle: "))
    assert "emoprompt.evaluation.job -> emoprompt.evaluation.runner" in cycle
    assert "function long has 81 lines" in problems
    assert "emoprompt.oddity: not in any layer" in problems


def test_a_clean_package_passes(tmp_path):
    package = _package(
        tmp_path,
        {
            "labels.py": "LABELS = ()\n",
            "data/__init__.py": "",
            "data/splits.py": "from emoprompt.labels import LABELS\n",
            "evaluation/__init__.py": "",
            "evaluation/runner.py": "from emoprompt.data.splits import LABELS\n",
        },
    )
    assert check_structure.check(package) == []
