"""The layering of the tree, read from the code: what may import what.

Static checks over every import statement (module level and function-local) of
``metamorph/``, ``train/`` and ``decode/``, plus one runtime check that the data
pipeline loads without flax. See docs/architecture.md for the layers.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("metamorph", "train", "decode")
MAX_LINES = 600  # past that a file is doing two jobs


def _modules() -> dict[str, str]:
  """Dotted module name -> file path, for every .py file of the packages."""
  out = {}
  for package in PACKAGES:
    for folder, _, files in os.walk(os.path.join(ROOT, package)):
      for name in files:
        if name.endswith(".py"):
          path = os.path.join(folder, name)
          dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
          out[dotted.removesuffix(".__init__")] = path
  return out


MODULES = _modules()


def _imports(path: str) -> list[tuple[str, ast.stmt, bool]]:
  """(imported module, statement, at module level) for each import of a file; for
  ``from a import b`` the module ``a.b`` when that is a module of ours, else ``a``."""
  tree = ast.parse(open(path, encoding="utf-8").read(), path)
  top = {id(node) for node in tree.body}
  for node in tree.body:  # `if TYPE_CHECKING:` / `try:` blocks at module level count as module level
    if isinstance(node, (ast.If, ast.Try)):
      top |= {id(n) for n in ast.walk(node)}
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out += [(alias.name, node, id(node) in top) for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      for alias in node.names:
        sub = f"{node.module}.{alias.name}"
        out.append((sub if sub in MODULES else node.module, node, id(node) in top))
  return out


def _ours(name: str) -> bool:
  return name.split(".")[0] in PACKAGES


def _graph() -> dict[str, set[str]]:
  """Module -> the modules of ours it imports (a package import counts as its __init__)."""
  return {mod: {name for name, _, _ in _imports(path) if _ours(name) and name in MODULES and name != mod}
          for mod, path in MODULES.items()}


def _violations(prefix: str, allowed) -> list[str]:
  out = []
  for mod, path in MODULES.items():
    if mod == prefix or mod.startswith(prefix + "."):
      for name, node, _ in _imports(path):
        if not allowed(name):
          out.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} imports {name}")
  return out


def test_the_library_never_imports_the_applications():
  bad = _violations("metamorph", lambda name: name.split(".")[0] not in ("train", "decode"))
  assert not bad, "\n".join(bad)


def test_the_data_pipeline_imports_neither_flax_nor_the_models():
  bad = _violations("metamorph.data", lambda name: not name.startswith(("flax", "metamorph.models"))
                    and (not _ours(name) or name.startswith(("metamorph.data", "metamorph.tokens"))))
  assert not bad, "\n".join(bad)


def test_the_data_pipeline_loads_without_flax():
  code = ("import sys, metamorph.data.pipeline, metamorph.data.tfds_builder, metamorph.data.build; "
          "print(sorted({m.split('.')[0] for m in sys.modules} & {'flax', 'diffusers'}))")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_shapes_world_imports_only_the_generic_data_layer_and_the_tokens():
  def allowed(name):
    return not _ours(name) or name.startswith(("metamorph.data", "metamorph.tokens", "metamorph.shapes"))
  assert "metamorph.shapes" in MODULES, "the shapes world lives in metamorph/shapes/"
  bad = _violations("metamorph.shapes", allowed)
  bad += _violations("metamorph.shapes", lambda name: not name.startswith("flax"))
  assert not bad, "\n".join(bad)


def test_models_do_not_import_conversion():
  bad = _violations("metamorph.models", lambda name: not name.startswith(("metamorph.convert", "metamorph.api",
                                                                          "metamorph.generation")))
  bad += _violations("metamorph.layers", lambda name: not _ours(name) or name.startswith(
      ("metamorph.layers", "metamorph.sharding")))
  assert not bad, "\n".join(bad)


def test_no_import_cycles():
  graph = _graph()
  index, low, stack, on_stack, cycles = {}, {}, [], set(), []

  def visit(v):  # Tarjan's strongly connected components
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        cycles.append(sorted(component))

  sys.setrecursionlimit(10_000)
  for v in graph:
    if v not in index:
      visit(v)
  assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_function_local_imports_say_why():
  """A function-local import only where the import is measurably slow, with its reason."""
  bad = []
  for mod, path in MODULES.items():
    lines = open(path, encoding="utf-8").read().splitlines()
    for name, node, top in _imports(path):
      if top:
        continue
      here = lines[node.lineno - 1] + (lines[node.lineno - 2] if node.lineno > 1 else "")
      if "slow import" not in here:
        bad.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} imports {name} inside a function "
                   "without a '# slow import: ...' reason")
  assert not bad, "\n".join(bad)


def test_library_files_stay_small():
  sizes = {os.path.relpath(path, ROOT): sum(1 for _ in open(path, encoding="utf-8")) for path in MODULES.values()}
  big = {path: n for path, n in sizes.items() if n > MAX_LINES}
  assert not big, f"files over {MAX_LINES} lines (split them by job): {big}"


def test_bench_scripts_import_the_installed_package():
  bench = os.path.join(ROOT, "bench")
  bad = [name for name in sorted(os.listdir(bench)) if name.endswith(".py")
         and "sys.path" in open(os.path.join(bench, name), encoding="utf-8").read()]
  assert not bad, f"bench scripts edit sys.path: {bad}"
