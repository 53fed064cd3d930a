"""The package's shape: no import cycles, family facts only in the adapters, a light command line."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "prunenet"


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, package: Path = PACKAGE) -> set[str]:
    """The modules of ``package`` that ``path`` imports anywhere: at module level and inside functions (a lazy
    import is an edge all the same: it runs whenever that function does). Not under ``TYPE_CHECKING``."""
    root = package.name
    name = module_name(path, package)
    parent = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []  # annotations only
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = parent.split(".")[: len(parent.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            if base == root or base.startswith(root + "."):
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == root)
    return found


def import_cycle(package: Path) -> list[str] | None:
    """One import cycle among the modules of ``package`` (module names, the first repeated last), or ``None``."""
    modules = {module_name(p, package): p for p in package.rglob("*.py")}
    graph = {
        name: {m for m in imports_of(path, package) if m in modules and m != name} for name, path in modules.items()
    }
    # A package's __init__ is imported before its submodules: an edge into a parent package is not a cycle.
    graph = {name: {m for m in deps if not name.startswith(m + ".")} for name, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return [*trail, node, dep]
            if dep not in state and (cycle := visit(dep, [*trail, node])):
                return cycle
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state and (cycle := visit(name, [])):
            return cycle
    return None


def test_no_import_cycles_inside_the_package():
    cycle = import_cycle(PACKAGE)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_a_cycle_through_a_function_level_import_is_found(tmp_path):
    """The shape of the cycles the package once had: a low module importing a high one inside a function."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "config.py").write_text("def validate():\n    from .selectors import SELECTORS\n")
    (package / "selectors.py").write_text("from .config import validate\nSELECTORS = {}\n")
    (package / "types_only.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import config\n"
    )
    assert import_cycle(package) == ["pkg.config", "pkg.selectors", "pkg.config"]
    (package / "config.py").write_text("def validate():\n    pass\n")
    assert import_cycle(package) is None


def test_no_model_type_comparisons_outside_the_adapters():
    """Family facts live in prunenet/adapters/: nothing else branches on config.model_type."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if "adapters" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and "model_type" in ast.unparse(node):
                offenders.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert not offenders, offenders


SIZE_FIELDS = {
    "hidden_size", "n_embd", "num_hidden_layers", "n_layer", "num_attention_heads", "n_head", "num_key_value_heads",
    "head_dim", "intermediate_size", "n_inner", "moe_intermediate_size", "num_experts", "num_local_experts",
    "max_position_embeddings", "n_positions", "vocab_size", "text_config",
}  # fmt: skip
"""The config fields in which families state their sizes differently (names, defaults, a wrapper's text_config)."""


def family_fields() -> set[str]:
    """:data:`SIZE_FIELDS` and every config attribute an adapter names as its width, expert count or text config."""
    from prunenet.adapters import REGISTRY

    named = {
        getattr(cls, attr) for cls in REGISTRY.values() for attr in ("width_attr", "experts_attr", "text_config_attr")
    }
    return SIZE_FIELDS | {name for name in named if name}


def family_config_reads(path: Path, fields: set[str]) -> list[str]:
    """Where ``path`` reads or writes one of ``fields`` of a config: ``<...config>.field`` (``config.head_dim``,
    ``model.config.vocab_size``) or ``getattr``/``hasattr``/``setattr`` with the field's name on anything."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr in fields:
            receiver = node.value
            name = receiver.id if isinstance(receiver, ast.Name) else getattr(receiver, "attr", "")
            if "config" in name:
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Call) and ast.unparse(node.func) in ("getattr", "hasattr", "setattr"):
            named = node.args[1] if len(node.args) > 1 else None
            if isinstance(named, ast.Constant) and named.value in fields:
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_family_config_fields_read_outside_the_adapters():
    """Sizes, attention shape, context length and vocabulary come from the adapter
    (``adapter.attention_shape(config)``), which knows each family's field names, defaults and wrappers."""
    fields = family_fields()
    offenders = [hit for path in PACKAGE.rglob("*.py") if "adapters" not in path.parts
                 for hit in family_config_reads(path, fields)]  # fmt: skip
    assert not offenders, offenders


def test_a_family_config_read_is_found(tmp_path):
    module = tmp_path / "planner.py"
    module.write_text(
        "def plan(adapter, config, text, shape):\n"
        "    heads = config.num_attention_heads\n"  # found
        "    kv = getattr(text, 'num_key_value_heads', None)\n"  # found
        "    n = model.config.intermediate_size\n"  # found
        "    d = adapter.hidden_size(config)\n"  # the adapter's answer: fine
        "    return shape.head_dim, config.model_type\n"  # a shape's field, a generic field: fine
    )
    assert sorted(hit.split(": ")[1] for hit in family_config_reads(module, family_fields())) == [
        "config.num_attention_heads", "getattr(text, 'num_key_value_heads', None)", "model.config.intermediate_size",
    ]  # fmt: skip


def test_the_command_line_parses_without_importing_torch():
    code = (
        "import sys; from prunenet.cli import build_parser, main\n"
        "build_parser().format_help()\n"
        "assert main(['compress', '--ratio', 'abc', '--out', 'x']) == 2\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, sorted(sys.modules)\n"
        "import prunenet; prunenet.__version__\n"
        "assert 'torch' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
