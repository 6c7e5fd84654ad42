"""Dependencies point one way: cli -> training / evaluation -> conversion -> modeling, where training and
evaluation use only conversion's checkpoint layer (model_path, reader) and its atomic writes (atomic), and
training also its in-memory upcycling (`llama_moe.conversion.upcycle_in_memory`, for --upcycle_from). No two
modules import each other, directly or around a loop, counting imports inside functions.

modeling/ is the remote-code bundle copied into checkpoints, so it may import only the standard library,
torch, transformers (and huggingface_hub, which transformers itself requires) and its own files by single-dot
imports; triton only inside `try: ... except ImportError` (transformers' remote-code check skips those, and a
checkpoint must load without it). No library part imports the CLI.
"""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("modeling", "conversion", "training", "evaluation", "cli")
MODELING_ALLOWED = {"torch", "transformers", "huggingface_hub"}
MODELING_OPTIONAL = {"triton"}  # allowed only where an ImportError is caught


def _imports(path: Path):
    """(level, module, imported names, node) of every import statement in the file, at any depth."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield 0, alias.name, [], node
        elif isinstance(node, ast.ImportFrom):
            yield node.level, node.module or "", [alias.name for alias in node.names], node


def _guarded_imports(path: Path) -> set[int]:
    """Line numbers of imports inside a `try` whose handlers catch ImportError."""
    lines = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Try):
            continue
        names = {ast.unparse(h.type) for h in node.handlers if h.type is not None}
        if names & {"ImportError", "ModuleNotFoundError"}:
            lines |= {
                n.lineno for stmt in node.body for n in ast.walk(stmt) if isinstance(n, (ast.Import, ast.ImportFrom))
            }
    return lines


def test_modeling_bundle_imports_only_torch_transformers_and_itself():
    problems = []
    for path in sorted((ROOT / "modeling").glob("*.py")):
        if path.name == "__init__.py":  # the package init is not part of the bundle
            continue
        guarded = _guarded_imports(path)
        for level, module, _, node in _imports(path):
            top = module.split(".")[0]
            if level == 1 and "." not in module:
                continue  # single-dot sibling import
            if level == 0 and top in MODELING_OPTIONAL and node.lineno in guarded:
                continue
            if level == 0 and (top in MODELING_ALLOWED or top in sys.stdlib_module_names):
                continue
            problems.append(f"{path.name}:{node.lineno} imports {'.' * level}{module}")
    assert not problems, problems


# ---------------------------------------------------------------------------------------------- the module graph


def _module_name(path: Path) -> str:
    """modeling/x.py -> "modeling.x"; conversion/methods/__init__.py -> "conversion.methods" (names below
    llama_moe, whose parts are installed from these folders)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def our_modules() -> dict[str, Path]:
    return {_module_name(path): path for part in PARTS for path in sorted((ROOT / part).rglob("*.py"))}


def _resolve(importer: str, is_package: bool, level: int, module: str) -> str | None:
    """The dotted name (below llama_moe) an import statement names, or None for another distribution's module."""
    if level == 0:
        return module.removeprefix("llama_moe.") if module.startswith("llama_moe.") else None
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def module_graph() -> tuple[dict[str, dict[str, list[tuple[int, list[str]]]]], list[str]]:
    """importer -> {imported module: [(line, names imported from it)]} over our modules, every import counted
    (inside functions and `if TYPE_CHECKING:` too). `from P import x` is an edge to the module P.x when there is
    one, else to P; a package means its __init__. Also the imports that name a module of ours that does not exist."""
    modules = our_modules()
    graph, unknown = {name: {} for name in modules}, []
    for importer, path in modules.items():
        for level, module, names, node in _imports(path):
            target = _resolve(importer, path.name == "__init__.py", level, module)
            if target is None:
                continue
            targets = [f"{target}.{n}" if f"{target}.{n}" in modules else target for n in names] or [target]
            for imported, name in zip(targets, names or [None]):
                if imported not in modules:
                    unknown.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {'.' * level}{module}")
                elif imported != importer:
                    graph[importer].setdefault(imported, []).append((node.lineno, [name] if name else []))
    return graph, unknown


def _cycles(graph: dict[str, dict]) -> list[tuple[list[str], set[str]]]:
    """Each group of two or more modules that import each other around loops (a strongly connected component),
    with one cycle through it (a path back to its start)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def connect(node):  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    cycles = []
    for group in groups:
        start = min(group)
        paths = {start: [start]}
        queue = [start]
        while queue:  # shortest way back to `start` inside the group
            node = queue.pop(0)
            for nxt in sorted(graph[node]):
                if nxt == start:
                    cycles.append((paths[node] + [start], group))
                    queue = []
                    break
                if nxt in group and nxt not in paths:
                    paths[nxt] = paths[node] + [nxt]
                    queue.append(nxt)
    return cycles


def test_every_import_of_ours_names_a_module_that_exists():
    assert not module_graph()[1]


def test_no_import_cycles_between_our_modules():
    graph, _ = module_graph()
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(
        f"{' -> '.join(cycle)}  (a loop among {sorted(group)})" for cycle, group in cycles
    )


def test_the_cycle_check_finds_a_cycle_through_a_package_init():
    graph = {"a": {"a.b": []}, "a.b": {"a": []}, "c": {"a": []}}
    assert _cycles(graph) == [(["a", "a.b", "a"], {"a", "a.b"})]


def test_library_parts_do_not_import_the_cli():
    graph, _ = module_graph()
    problems = [
        f"{importer} imports {imported}"
        for importer, edges in graph.items()
        if not importer.startswith("cli")
        for imported in edges
        if imported.split(".")[0] == "cli"
    ]
    assert not problems, problems


def test_conversion_imports_no_training_or_evaluation_and_they_use_only_its_checkpoint_layer():
    allowed = {"conversion.model_path": None, "conversion.reader": None, "conversion.atomic": None}
    allowed_in_training = allowed | {"conversion": {"upcycle_in_memory"}}  # the package: only this name
    graph, _ = module_graph()
    problems = []
    for importer, edges in graph.items():
        part = importer.split(".")[0]
        for imported, uses in edges.items():
            top = imported.split(".")[0]
            if part == "conversion" and top in ("training", "evaluation"):
                problems.append(f"{importer} imports {imported}")
            if part in ("training", "evaluation") and top == "conversion":
                rules = allowed_in_training if part == "training" else allowed
                names = {name for _, used in uses for name in used}
                if imported not in rules or (rules[imported] is not None and not names <= rules[imported]):
                    problems.append(f"{importer} imports {imported} {sorted(names)}")
            if part == "training" and top == "evaluation" or part == "evaluation" and top == "training":
                problems.append(f"{importer} imports {imported}")
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
