"""The architecture as a test: read the import graph with `ast` and fail on a broken rule.

The rules are those of ARCHITECTURE.md:

* the foundation imports no stage package and no orchestration module;
* a stage package imports the foundation, its own modules, and upstream stages through their
  public `__init__` only (crawl -> dedup -> validate -> embed -> index);
* publish.py, client.py and the serve/ package read snapshots through snapshot.py, never through
  the index build;
* nothing but `pipelines/cli/` (and `jobs/`) imports the CLI; nothing in `pipelines/` imports
  Airflow; DAGs import only the orchestration entry points;
* no import cycle;
* an import of a project module inside a function says why in a comment (the only accepted
  reason: keeping a heavy dependency out of import time);
* every warehouse key is spelt in layout.py only.
"""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

FOUNDATION = {"config", "layout", "storage", "spark", "progress", "readers", "fingerprint", "snapshot", "errors",
              "decode", "address_policy", "guarded_http"}
STAGES = ["crawl", "dedup", "validate", "embed", "index"]  # pipeline order: each may use the ones before it
ORCHESTRATION = {"pipeline", "publish", "client", "search", "report", "sample_catalog", "serve"}
HEAVY = ("torch", "faiss", "great_expectations", "pyspark", "petastorm", "scipy", "timm", "torchvision")
# Top-level folders of the warehouse: a key starting with one of these belongs in layout.py.
WAREHOUSE_FOLDERS = ("runs/", "images/", "quarantine/", "dedup/", "embeddings/", "indexes/", "reports/", "models/")


@dataclass(frozen=True)
class Import:
    source: str        # importing module, dotted (pipelines.crawl.stage)
    target: str        # imported module, dotted (pipelines.readers)
    line: int
    in_function: bool
    justified: bool    # a comment on the line or the line above says why it is not at the top


def module_name(path: Path, root: Path = REPO) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def python_files(root: Path = REPO) -> list[Path]:
    return sorted(p for folder in ("pipelines", "schemas", "jobs", "dags") for p in (root / folder).rglob("*.py"))


def imports_of(path: Path, root: Path = REPO, known: set[str] | None = None) -> list[Import]:
    """Every import of a project module in `path`; `from pipelines import layout` names the module."""
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    me = module_name(path, root)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(n) for n in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                targets.append(candidate if known is not None and candidate in known else base)
        else:
            continue
        # The reason may stand on the line itself or just above a group of imports.
        comment = " ".join(line for line in lines[max(0, node.lineno - 4): node.end_lineno] if "#" in line)
        for target in targets:
            if target.split(".")[0] in ("pipelines", "schemas", "jobs", "dags"):
                found.append(Import(me, target, node.lineno, id(node) in in_function, "import time" in comment))
    return sorted(set(found), key=lambda imp: (imp.source, imp.line, imp.target))


def project_graph(root: Path = REPO) -> list[Import]:
    files = python_files(root)
    known = {module_name(p, root) for p in files}
    return [imp for path in files for imp in imports_of(path, root, known)]


def _parts(name: str) -> list[str]:
    return name.split(".")


def layer_of(module: str) -> tuple[str, str | None]:
    """('foundation'|'stage'|'orchestration'|'cli'|'schemas'|'jobs'|'dags'|'root', stage name)."""
    parts = _parts(module)
    if parts[0] in ("schemas", "jobs", "dags"):
        return parts[0], None
    if len(parts) == 1:
        return "root", None
    head = parts[1]
    if head in FOUNDATION:
        return "foundation", None
    if head in STAGES:
        return "stage", head
    if head in ORCHESTRATION:
        return "orchestration", head
    if head == "cli":
        return "cli", None
    return "unknown", head


def violations(graph: list[Import]) -> list[str]:
    problems = []
    for imp in graph:
        src_layer, src_stage = layer_of(imp.source)
        dst_layer, dst_stage = layer_of(imp.target)
        where = f"{imp.source}:{imp.line} imports {imp.target}"
        if dst_layer == "unknown" or src_layer == "unknown":
            problems.append(f"{where}: module outside the documented layers (add it to ARCHITECTURE.md and this test)")
            continue
        if src_layer in ("foundation", "schemas") and dst_layer not in ("foundation", "schemas", "root"):
            problems.append(f"{where}: the foundation imports no stage, orchestration or CLI module")
        if src_layer == "stage":
            if dst_layer in ("orchestration", "cli", "jobs", "dags"):
                problems.append(f"{where}: a stage imports the foundation and upstream stages only")
            if dst_layer == "stage" and dst_stage != src_stage:
                if STAGES.index(dst_stage) > STAGES.index(src_stage):
                    problems.append(f"{where}: {src_stage} runs before {dst_stage}: a stage never imports a "
                                    "downstream stage")
                elif imp.target != f"pipelines.{dst_stage}":
                    problems.append(f"{where}: use the upstream stage's public package `pipelines.{dst_stage}`")
        if src_layer == "orchestration":
            if dst_layer in ("cli", "jobs", "dags"):
                problems.append(f"{where}: orchestration never imports the CLI")
            if dst_layer == "stage" and imp.target != f"pipelines.{dst_stage}":
                problems.append(f"{where}: import the stage's public package `pipelines.{dst_stage}`")
            if src_stage in ("publish", "client", "search", "serve") and dst_stage == "index":
                problems.append(f"{where}: {src_stage} reads snapshots through pipelines.snapshot, never the build")
        if dst_layer == "cli" and src_layer not in ("cli", "jobs"):
            problems.append(f"{where}: only the CLI and jobs/ import pipelines.cli")
        if src_layer == "dags" and imp.target not in ("pipelines.config", "pipelines.pipeline", "pipelines.spark",
                                                      "pipelines.layout"):
            problems.append(f"{where}: DAGs schedule; they import pipelines.config, .pipeline, .spark and .layout "
                            "(asset URIs) only")
        if src_layer == "jobs" and dst_layer not in ("cli", "orchestration", "foundation"):
            problems.append(f"{where}: a job is thin: args -> the CLI")
        if imp.in_function and not imp.justified:
            problems.append(f"{where} inside a function without a comment saying which heavy dependency it keeps "
                            "out of import time (move it to the top of the module, or say why)")
    return problems


def cycles(graph: list[Import]) -> list[list[str]]:
    """Cycles among module-level imports (those that run when a module is imported)."""
    edges: dict[str, set[str]] = {}
    for imp in graph:
        if not imp.in_function and imp.target != imp.source:
            edges.setdefault(imp.source, set()).add(imp.target)
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            # `import pipelines.crawl.stage` runs pipelines/crawl/__init__.py first: an edge to
            # a parent package is not a cycle of its own.
            if node.startswith(nxt + "."):
                continue
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return found


def airflow_imports(root: Path = REPO) -> list[str]:
    bad = []
    for path in (root / "pipelines").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad += [f"{module_name(path, root)}:{node.lineno} imports {n}" for n in names if n.split(".")[0] == "airflow"]
    return bad


def keys_outside_layout(root: Path = REPO) -> list[str]:
    """String literals that start with a warehouse folder, outside layout.py (docstrings aside)."""
    bad = []
    for path in (root / "pipelines").rglob("*.py"):
        if path.name == "layout.py":
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)
                      and isinstance(node.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                if node.value.startswith(WAREHOUSE_FOLDERS):
                    bad.append(f"{module_name(path, root)}:{node.lineno} spells the warehouse key {node.value!r}")
    return sorted(bad)


# ---------------------------------------------------------------------------------------
# the tree as it is
# ---------------------------------------------------------------------------------------

def test_the_tree_follows_the_layering_rules():
    graph = project_graph()
    assert len(graph) > 100  # the reader found the project's imports
    problems = violations(graph)
    assert not problems, "\n".join(problems)


def test_no_import_cycle():
    found = cycles(project_graph())
    assert not found, "\n".join(" -> ".join(c) for c in found)


def test_stage_logic_never_imports_airflow():
    assert not airflow_imports()


def test_every_warehouse_key_is_built_in_layout():
    bad = keys_outside_layout()
    assert not bad, "\n".join(bad)


def test_no_module_grows_past_what_a_reader_holds_in_mind():
    """~500 lines; a longer module says why in its docstring ("longer than 500 lines because ...")."""
    long = []
    for path in (REPO / "pipelines").rglob("*.py"):
        text = path.read_text()
        if text.count("\n") > 520 and "longer than 500 lines because" not in text:
            long.append(f"{path.relative_to(REPO)}: {text.count(chr(10))} lines")
    assert not long, "\n".join(long)


def test_help_and_the_light_packages_import_no_heavy_dependency():
    """`catalog-index --help` and the stage packages' public __init__s load no torch, faiss, GX or Spark."""
    script = ("import sys, pipelines.cli, pipelines.pipeline, pipelines.client, pipelines.snapshot;"
              "print(sorted({m.split('.')[0] for m in sys.modules} & set(sys.argv[1:])))")
    out = subprocess.run([sys.executable, "-c", script, "torch", "faiss", "great_expectations", "pyspark",
                          "petastorm"], capture_output=True, text=True, check=True, cwd=REPO).stdout.strip()
    assert out == "[]"


# ---------------------------------------------------------------------------------------
# the checker catches what it claims to catch (on a scratch tree, one broken rule each)
# ---------------------------------------------------------------------------------------

def _scratch_tree(tmp_path: Path, files: dict[str, str]) -> list[Import]:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for folder in ("pipelines", "schemas", "jobs", "dags"):
        (tmp_path / folder).mkdir(exist_ok=True)
    return project_graph(tmp_path)


BASE = {"pipelines/__init__.py": "", "pipelines/layout.py": "", "pipelines/snapshot.py": "",
        "pipelines/crawl/__init__.py": "", "pipelines/crawl/stage.py": "",
        "pipelines/dedup/__init__.py": "", "pipelines/dedup/stage.py": "",
        "pipelines/index/__init__.py": "", "pipelines/index/stage.py": "", "pipelines/client.py": ""}


@pytest.mark.parametrize("name, text, message", [
    ("pipelines/crawl/stage.py", "from pipelines.dedup import run_dedup\n", "never imports a downstream stage"),
    ("pipelines/dedup/stage.py", "from pipelines.crawl.stage import run_crawl\n", "public package `pipelines.crawl`"),
    ("pipelines/layout.py", "from pipelines.crawl import run_crawl\n", "the foundation imports no stage"),
    ("pipelines/client.py", "from pipelines.index import build_index\n", "never the build"),
    ("pipelines/snapshot.py", "def f():\n    from pipelines import layout\n", "inside a function without a comment"),
    ("pipelines/index/stage.py", "from pipelines.cli import main\n", "only the CLI and jobs/"),
])
def test_the_checker_fails_when_a_rule_is_broken(tmp_path, name, text, message):
    assert not violations(_scratch_tree(tmp_path / "ok", BASE))
    problems = violations(_scratch_tree(tmp_path / "broken", {**BASE, name: text}))
    assert any(message in p for p in problems), problems


def test_the_checker_accepts_a_justified_lazy_import(tmp_path):
    text = "def f():\n    # torch: keeps it out of import time\n    from pipelines import layout\n"
    assert not violations(_scratch_tree(tmp_path, {**BASE, "pipelines/snapshot.py": text}))


def test_the_checker_finds_a_cycle(tmp_path):
    graph = _scratch_tree(tmp_path, {**BASE, "pipelines/layout.py": "from pipelines import snapshot\n",
                                     "pipelines/snapshot.py": "from pipelines import layout\n"})
    assert cycles(graph) and {"pipelines.layout", "pipelines.snapshot"} <= set(cycles(graph)[0])


def test_the_checker_finds_a_key_outside_layout(tmp_path):
    _scratch_tree(tmp_path, {**BASE, "pipelines/client.py": 'KEY = f"indexes/{1}/LATEST"\nX = "dedup/hashes/"\n'})
    found = keys_outside_layout(tmp_path)
    assert len(found) == 2 and re.search("indexes/", found[0]) and re.search("dedup/hashes", found[1])
