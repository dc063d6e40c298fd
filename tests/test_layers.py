"""The package's layers, read from its source with `ast` (nothing is imported, so no torch): no import cycle among
its modules, and each layer imports only the layers below it (`MAY_IMPORT`):

    algo  <-  base  <-  workers  <-  eval  <-  stages  <-  tools          (`A <- B`: B may import A, never back)

- `posttrain.algo`: pure torch; imports nothing of posttrain but algo.
- base: every module of `posttrain/` outside the subpackages and the tools (config, data, model, tokenizer,
  generate, learner, ...); imports algo, base, tasks and rewards.
- `posttrain.tasks`: tasks, rewards (the grader the reward and the evaluation share), algo (the registry type) and
  the base modules `posttrain.tokenizer` (its special-token strings), `posttrain.data` (the row reader),
  `posttrain.budgets` and `posttrain.runlog` only; code that loads or samples a model (`eval.traces`) stands above
  them.
- `posttrain.rewards` (`rewards/`): rewards, base modules and algo (the registry type), never tasks or above. Base and rewards import each
  other (the recipe schema checks reward names against the reward registry; GenRM loads its model), so between
  those two only the cycle check keeps the order.
- `posttrain.workers`: base and below, never eval, stages or the tools.
- `posttrain.eval` (`eval/`): workers and below, never stages (the RL stage imports eval's aggregation, not back).
- `posttrain.stages`: anything but the tools; nothing outside the stages imports them but the tools.
- tools: `posttrain.cli`, `posttrain.pipeline` and `posttrain.bench*`, imported only by one another.

Function-local imports count as much as module-level ones (they only hide a cycle until the function runs), and so
do `TYPE_CHECKING` ones. Imports by string (the stage registry's `importlib.import_module`) are not seen.
"""

from __future__ import annotations

import ast
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TOOLS = ("posttrain.cli", "posttrain.pipeline")  # and posttrain.bench* (bench, bench_report, bench_trl)
SUBPACKAGES = ("algo", "rewards", "tasks", "workers", "eval", "stages")
BASE_AND_BELOW = {"algo", "rewards", "tasks", "base"}
MAY_IMPORT = {  # layer -> the layers (or single modules) its modules may import
    "algo": {"algo"},
    "rewards": {"rewards", "base", "algo"},
    "tasks": {"tasks", "rewards", "algo", "posttrain.tokenizer", "posttrain.data", "posttrain.budgets",
              "posttrain.runlog"},
    "base": BASE_AND_BELOW,
    "workers": BASE_AND_BELOW | {"workers"},
    "eval": BASE_AND_BELOW | {"workers", "eval"},
    "stages": BASE_AND_BELOW | {"workers", "eval", "stages"},
    "tools": BASE_AND_BELOW | {"workers", "eval", "stages", "tools"},
}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the project module imported (the longest one the imported name starts with)
    where: str  # file:line of the import statement, relative to the root


def package_dirs(root: Path = ROOT) -> dict[str, str]:
    """{package: folder} as pyproject.toml installs them: posttrain, and rewards/ and eval/ under its namespace."""
    return tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]


def module_files(root: Path, packages: dict[str, str]) -> dict[str, Path]:
    """{dotted module name: file} of every .py under each package folder."""
    out = {}
    for package, folder in packages.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root / folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            out[".".join((package, *parts))] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def module_imports(name: str, path: Path, modules: dict[str, Path], root: Path) -> list[Import]:
    """Every import of a project module in the file, at any depth; `from X import a` imports X, and X.a when that is
    a module; relative imports resolved. Imports of the module's own packages (`__init__`s) are left out."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*parts, base] if base else parts)
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        where = f"{path.relative_to(root)}:{node.lineno}"
        for target in dict.fromkeys(t for t in (_resolve(n, modules) for n in names) if t):
            if target != name and not name.startswith(target + "."):
                out.append(Import(name, target, where))
    return out


def import_graph(root: Path = ROOT, packages: dict[str, str] | None = None) -> tuple[list[str], list[Import]]:
    """(every module, every import between them) of the project's packages under `root`."""
    modules = module_files(root, packages or package_dirs(root))
    return list(modules), [i for m, p in modules.items() for i in module_imports(m, p, modules, root)]


def cycles(modules: list[str], imports: list[Import]) -> list[list[str]]:
    """The strongly connected groups of two or more modules (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for i in imports:
        graph[i.source].add(i.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []

    def visit(v: str) -> None:  # the package has ~100 modules: recursion depth is no concern
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for m in sorted(graph):
        if m not in index:
            visit(m)
    return out


def layer(module: str) -> str:
    if module in TOOLS or module.startswith("posttrain.bench"):
        return "tools"
    for sub in SUBPACKAGES:
        if module == f"posttrain.{sub}" or module.startswith(f"posttrain.{sub}."):
            return sub
    return "base"


def layer_breaches(imports: list[Import]) -> list[str]:
    """One line per import that goes up or sideways across the layers (`MAY_IMPORT`)."""
    out = []
    for i in imports:
        src, dst = layer(i.source), layer(i.target)
        allowed = MAY_IMPORT[src]
        if dst not in allowed and i.target not in allowed:
            out.append(f"{i.where}: {i.source} ({src}) imports {i.target} ({dst}); {src} may import only "
                       f"{', '.join(sorted(allowed))}")
    return out


def describe_cycles(groups: list[list[str]], imports: list[Import]) -> str:
    lines = []
    for group in groups:
        members = set(group)
        lines.append(f"cycle of {len(group)}: {', '.join(group)}; its imports:")
        lines += [f"  {i.where}: {i.source} -> {i.target}" for i in imports
                  if i.source in members and i.target in members]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------- tests


def test_no_import_cycle():
    modules, imports = import_graph()
    groups = cycles(modules, imports)
    assert not groups, "import cycles (function-local imports included):\n" + describe_cycles(groups, imports)


def test_each_layer_imports_only_the_layers_below_it():
    _, imports = import_graph()
    breaches = layer_breaches(imports)
    assert not breaches, "imports across the layers (see tests/test_layers.py):\n" + "\n".join(breaches)


def test_the_graph_sees_every_kind_of_import():
    """The walk finds the packages' modules and the imports the checks rely on (a walk that found nothing would
    pass both checks)."""
    modules, imports = import_graph()
    assert {"posttrain.cli", "posttrain.rewards.registry", "posttrain.eval.sweep", "posttrain.algo.kl"} <= set(modules)
    found = {(i.source, i.target) for i in imports}
    assert ("posttrain.algo.kl", "posttrain.algo.losses") in found  # module level
    assert ("posttrain.stages.rl", "posttrain.stages.rl_problems") in found  # inside a method
    assert ("posttrain.eval.plots", "posttrain.eval.sweep") in found  # rewards/ and eval/ under the namespace
    assert ("posttrain.rewards.math", "posttrain.rewards.parse") in found  # a relative import
    assert ("posttrain.pipeline", "posttrain.stages") in found  # a package's __init__


def test_the_checks_name_a_planted_cycle_and_breach(tmp_path):
    """A scratch tree where a task samples with a worker (a function-local import) and the worker imports the task
    back (a relative import): both checks fail, naming the file and line."""
    files = {
        "posttrain/__init__.py": "",
        "posttrain/tasks/__init__.py": "",
        "posttrain/tasks/a.py": "import re\n\n\ndef main():\n    from posttrain.workers.w import Worker\n",
        "posttrain/workers/__init__.py": "",
        "posttrain/workers/w.py": "from ..tasks import a\n\n\nclass Worker:\n    pass\n",
        "posttrain/algo/__init__.py": "",
        "posttrain/algo/k.py": "from posttrain.algo import registry\nfrom posttrain.model import load\n",
        "posttrain/algo/registry.py": "",
        "posttrain/model.py": "",
        "rewards/__init__.py": "from .r import f\n",
        "rewards/r.py": "def f():\n    from posttrain.stages import s\n",
        "posttrain/stages/__init__.py": "",
        "posttrain/stages/s.py": "",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    modules, imports = import_graph(tmp_path, {"posttrain": "posttrain", "posttrain.rewards": "rewards"})
    groups = cycles(modules, imports)
    assert groups == [["posttrain.tasks.a", "posttrain.workers.w"]]
    report = describe_cycles(groups, imports)
    assert "posttrain/tasks/a.py:5: posttrain.tasks.a -> posttrain.workers.w" in report
    assert "posttrain/workers/w.py:1: posttrain.workers.w -> posttrain.tasks.a" in report
    breaches = "\n".join(layer_breaches(imports))
    assert "posttrain/tasks/a.py:5: posttrain.tasks.a (tasks) imports posttrain.workers.w (workers)" in breaches
    assert "posttrain/algo/k.py:2: posttrain.algo.k (algo) imports posttrain.model (base)" in breaches
    assert "rewards/r.py:2: posttrain.rewards.r (rewards) imports posttrain.stages.s (stages)" in breaches
    assert "posttrain/workers/w.py" not in breaches  # workers may import tasks
    assert "posttrain/algo/k.py:1" not in breaches
