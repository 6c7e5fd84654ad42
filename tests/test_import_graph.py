"""Dependencies point one way: cli -> training / evaluation -> conversion -> modeling, where training and
evaluation use only conversion's checkpoint layer (model_path, reader) and its atomic writes (atomic).

modeling/ is the remote-code bundle copied into checkpoints, so it may import only the standard library,
torch, transformers (and huggingface_hub, which transformers itself requires) and its own files by single-dot
imports; triton only inside `try: ... except ImportError` (transformers' remote-code check skips those, and a
checkpoint must load without it). No library part imports the CLI.
"""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELING_ALLOWED = {"torch", "transformers", "huggingface_hub"}
MODELING_OPTIONAL = {"triton"}  # allowed only where an ImportError is caught


def _imports(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield 0, alias.name, node
        elif isinstance(node, ast.ImportFrom):
            yield node.level, node.module or "", node


def _guarded_imports(path: Path) -> set[int]:
    """Line numbers of imports inside a `try` whose handlers catch ImportError."""
    lines = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Try):
            continue
        names = {ast.unparse(h.type) for h in node.handlers if h.type is not None}
        if names & {"ImportError", "ModuleNotFoundError"}:
            lines |= {n.lineno for stmt in node.body for n in ast.walk(stmt) if isinstance(n, (ast.Import, ast.ImportFrom))}
    return lines


def _is_module_level(tree_node, path):
    tree = ast.parse(path.read_text())
    return any(tree_node.lineno == node.lineno for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom)))


def test_modeling_bundle_imports_only_torch_transformers_and_itself():
    problems = []
    for path in sorted((ROOT / "modeling").glob("*.py")):
        if path.name == "__init__.py":  # the package init is not part of the bundle
            continue
        guarded = _guarded_imports(path)
        for level, module, node in _imports(path):
            top = module.split(".")[0]
            if level == 1 and "." not in module:
                continue  # single-dot sibling import
            if level == 0 and top in MODELING_OPTIONAL and node.lineno in guarded:
                continue
            if level == 0 and (top in MODELING_ALLOWED or top in sys.stdlib_module_names):
                continue
            if level == 0 and top == "llama_moe" and not _is_module_level(node, path):
                continue  # lazy import inside a function (from_dense), never at module level
            problems.append(f"{path.name}:{node.lineno} imports {'.' * level}{module}")
    assert not problems, problems


def test_library_parts_do_not_import_the_cli():
    problems = []
    for part in ("modeling", "conversion", "training", "evaluation"):
        for path in sorted((ROOT / part).rglob("*.py")):
            for level, module, node in _imports(path):
                if module.startswith("llama_moe.cli") or (level == 0 and module.split(".")[0] == "cli"):
                    problems.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {module}")
    assert not problems, problems


def _package_imports(path: Path) -> list[tuple[str, int]]:
    """Absolute `llama_moe.X...` and relative `..X...` imports as dotted names below llama_moe."""
    found = []
    for level, module, node in _imports(path):
        if level == 0 and module.startswith("llama_moe."):
            found.append((module.removeprefix("llama_moe."), node.lineno))
        elif level >= 2:
            found.append((module, node.lineno))
    return found


def test_conversion_imports_no_training_or_evaluation_and_they_use_only_its_checkpoint_layer():
    checkpoint_layer = {"conversion.model_path", "conversion.reader", "conversion.atomic"}
    problems = []
    for part in ("conversion", "training", "evaluation"):
        for path in sorted((ROOT / part).rglob("*.py")):
            for module, line in _package_imports(path):
                top = module.split(".")[0]
                if part == "conversion" and top in ("training", "evaluation"):
                    problems.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
                if part != "conversion" and top == "conversion" and module not in checkpoint_layer:
                    problems.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not problems, problems


def test_the_conversion_package_loads_its_parts_when_first_used():
    """`llama_moe.conversion.upcycle` is the function (its module is `pipeline`), and importing a light module of
    the package (what training and evaluation use) does not load the conversion code."""
    import subprocess

    script = (
        "import sys, types\n"
        "import llama_moe.conversion.model_path\n"
        "assert 'llama_moe.conversion.pipeline' not in sys.modules and 'torch' not in sys.modules\n"
        "import llama_moe.conversion as conversion\n"
        "from llama_moe.conversion.pipeline import upcycle, upcycle_in_memory\n"
        "assert conversion.upcycle is upcycle and conversion.upcycle_in_memory is upcycle_in_memory\n"
        "assert all(getattr(conversion, name) is not None for name in conversion.__all__)\n"
        "assert isinstance(conversion.pipeline, types.ModuleType)\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
