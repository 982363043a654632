"""Every `from vaebuild.x import name` in the package names something x defines, checked without importing x.

The kernel modules import Triton, which CPU-only CI lacks, so an import error there shows only on a GPU; this
reads the source instead.
"""

import ast
from pathlib import Path

import vaebuild

PACKAGE = Path(vaebuild.__file__).parent


def module_file(name):
    """The source file of module `name` (a dotted vaebuild name), or None."""
    path = PACKAGE.parent.joinpath(*name.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def top_level_names(path):
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.If, ast.Try)):  # guarded definitions count too
            names.update(top_level_names_of(node))
    return names


def top_level_names_of(node):
    names = set()
    for child in ast.walk(node):
        if isinstance(child, (ast.FunctionDef, ast.ClassDef)):
            names.add(child.name)
        elif isinstance(child, ast.Name) and isinstance(child.ctx, ast.Store):
            names.add(child.id)
        elif isinstance(child, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in child.names)
    return names


def test_vaebuild_from_imports_name_what_their_modules_define():
    missing = []
    for source in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(source.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vaebuild")):
                continue
            target = module_file(node.module)
            if target is None:
                missing.append(f"{source.relative_to(PACKAGE.parent)}: no module {node.module}")
                continue
            defined = top_level_names(target)
            for alias in node.names:
                if alias.name not in defined and module_file(f"{node.module}.{alias.name}") is None:
                    missing.append(f"{source.relative_to(PACKAGE.parent)}: {node.module} has no {alias.name}")
    assert not missing, "\n".join(missing)
