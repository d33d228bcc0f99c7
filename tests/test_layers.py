"""The layers: ``pipeline`` (the library) never imports the orchestrator (``tasks``, ``flows``, Prefect),
and inside it the subpackages import only downward: core <- data <- model <- training, registry <- store."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ORCHESTRATOR = ("prefect", "tasks", "flows")


# What each part of ``pipeline`` may import from the others. The core is the package's top-level
# modules (config, config_sources, storage, errors, code_version); the registry reads a finished
# run's metrics file but nothing else of how training works.
CORE = "core"
MAY_IMPORT = {
    CORE: {CORE},
    "data": {CORE, "data"},
    "model": {CORE, "data", "model"},
    "training": {CORE, "data", "model", "training"},
    "registry": {CORE, "data", "model", "registry", "pipeline.training.metrics"},
    # retention and the inventory read every part's layout (datasets, run dirs, registry): the top
    "store": {CORE, "data", "model", "training", "registry", "store"},
}


def library_modules(repo: Path = REPO) -> list[Path]:
    return sorted((repo / "pipeline").rglob("*.py"))


def imported_names(path: Path) -> set[str]:
    """Every module an ``import`` / ``from ... import`` names, at any depth (lazy imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def part_of(module: str) -> str:
    """``pipeline.data.vocab`` (or ``pipeline.data``) -> ``data``; ``pipeline.storage`` -> the core."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in MAY_IMPORT else CORE


def pipeline_imports(path: Path) -> set[str]:
    """The ``pipeline`` modules ``path`` imports; ``from pipeline.x import y`` counts as ``pipeline.x.y``
    (y may be a module), so ``from pipeline import training`` is seen too."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return {n for n in names if n.startswith("pipeline.")}


def layer_violations(repo: Path = REPO) -> dict[str, list[str]]:
    """``{module file: [pipeline modules it may not import]}`` under ``repo``."""
    out = {}
    for path in library_modules(repo):
        rel = path.relative_to(repo)
        if rel.name == "__init__.py" and len(rel.parts) == 2:
            continue
        own = part_of(".".join(rel.with_suffix("").parts))
        allowed = MAY_IMPORT[own]
        bad = sorted(n for n in pipeline_imports(path)
                     if part_of(n) not in allowed and not any(n.startswith(a + ".") or n == a for a in allowed))
        if bad:
            out[str(rel)] = bad
    return out


def test_subpackages_import_only_downward():
    assert {p.name for p in (REPO / "pipeline").iterdir() if (p / "__init__.py").is_file()} == set(MAY_IMPORT) - {CORE}
    assert layer_violations() == {}


def test_a_wrong_way_import_is_caught(tmp_path):
    shutil.copytree(REPO / "pipeline", tmp_path / "pipeline")
    vocab = tmp_path / "pipeline" / "data" / "vocab.py"
    vocab.write_text(vocab.read_text() + "\n\ndef _late():\n    from pipeline.training.train import train\n")
    lm = tmp_path / "pipeline" / "model" / "lm.py"
    lm.write_text("from pipeline.registry import tracking\n" + lm.read_text())
    assert layer_violations(tmp_path) == {"pipeline/data/vocab.py": ["pipeline.training.train.train"],
                                          "pipeline/model/lm.py": ["pipeline.registry.tracking"]}


def test_no_library_module_imports_the_orchestrator():
    offenders = {str(p.relative_to(REPO)): sorted(n for n in imported_names(p) if n.split(".")[0] in ORCHESTRATOR)
                 for p in library_modules()}
    assert not {k: v for k, v in offenders.items() if v}


def test_every_library_module_imports_with_prefect_unimportable():
    modules = [".".join(p.relative_to(REPO).with_suffix("").parts) for p in library_modules()]
    modules = [m.removesuffix(".__init__") for m in modules]
    code = ("import importlib, sys\n"
            "for name in ('prefect', 'tasks', 'flows'):\n"
            "    sys.modules[name] = None  # any import of them raises ImportError\n"
            f"for m in {modules!r}:\n"
            "    importlib.import_module(m)\n"
            "print('ok', len(sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr[-3000:]


def test_the_cli_lives_outside_the_library():
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "presets"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "timemachine-char" in proc.stdout.split(), proc.stderr[-3000:]
    assert not (REPO / "pipeline" / "cli.py").exists()


def test_every_cached_stage_has_a_module_list_of_existing_files():
    import tasks
    from pipeline.code_version import STAGE_MODULES, code_digest
    from tasks.caching import StagePolicy

    stages = {getattr(tasks, name).cache_policy.stage for name in tasks.__all__
              if isinstance(getattr(getattr(tasks, name), "cache_policy", None), StagePolicy)}
    assert stages == {"fetch", "count", "vocab", "encode", "shards", "train", "evaluate"}
    assert stages == set(STAGE_MODULES)
    for stage, modules in STAGE_MODULES.items():
        assert len(code_digest(stage)) == 16 and all((REPO / m).is_file() for m in modules), stage


def project_imports(module: str, seen: set[str] | None = None) -> set[str]:
    """The project files ``module`` (a path like ``pipeline/training/train.py``) imports, transitively, lazy imports included."""
    seen = set() if seen is None else seen
    for name in imported_names(REPO / module):
        path = name.replace(".", "/") + ".py"
        if name.split(".")[0] == "pipeline" and (REPO / path).is_file() and path not in seen:
            seen.add(path)
            project_imports(path, seen)
    return seen


def test_stage_module_lists_cover_what_the_stages_import():
    from pipeline.code_version import STAGE_MODULES

    # rewording an error or changing the progress display recomputes nothing
    messages_only = {"pipeline/errors.py", "pipeline/progress.py", "pipeline/training/progress.py"}
    entries = {"count": ["pipeline/data/prepare.py"], "train": ["pipeline/training/train.py", "pipeline/training/launch.py"],
               "evaluate": ["pipeline/model/lm.py"]}
    for stage, modules in entries.items():
        needed = set(modules).union(*(project_imports(m) for m in modules)) - messages_only
        assert needed <= set(STAGE_MODULES[stage]), (stage, sorted(needed - set(STAGE_MODULES[stage])))
