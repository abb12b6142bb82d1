"""What a Python file imports, read from its source (ast): the layer check and the GPU kit's guard use it."""

import ast
from collections.abc import Callable


def imports(path: str, module: str, is_module: Callable[[str], bool], at_import: bool = False) -> list[tuple[str, int]]:
    """(absolute module name, line) for each import in the file; relative imports are resolved against
    `module` (the file's dotted name), and `from p import x` names the submodule p.x where
    `is_module(p.x)`. `at_import`: only the statements that run when the module is imported (not
    inside functions or classes). `if TYPE_CHECKING:` blocks never count: they are annotations only."""
    tree = ast.parse(open(path).read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = []

    def visit(node):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            return
        if at_import and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            subs = [f"{base}.{alias.name}" for alias in node.names if is_module(f"{base}.{alias.name}")]
            found.extend((name, node.lineno) for name in subs or [base])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found
