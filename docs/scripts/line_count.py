"""Lines under ultrajax/ (issue 16's measure), split into code, docstring, comment and blank lines.

  python docs/scripts/line_count.py [path prefix ...]   (from a checkout's root; with prefixes:
                                                          those files, one line each)

Every .py file under ultrajax/ except the configs symlink, i.e. the same total as
`git ls-files ultrajax | grep '\\.py$' | xargs cat | wc -l`. The filing's count (21,335) is
a9d1934's tree formatted with today's ruff configuration: `git archive a9d1934 ultrajax
pyproject.toml | tar -x -C DIR`, copy today's pyproject.toml over it, `ruff format DIR/ultrajax`.
"""

import ast
import collections
import pathlib
import sys


def docstring_lines(source: str) -> set[int]:
  """Line numbers of the module's, classes' and functions' docstrings."""
  lines = set()
  kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
  for node in ast.walk(ast.parse(source)):
    first = node.body[0] if isinstance(node, kinds) and node.body else None
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
      if isinstance(first.value.value, str):
        lines.update(range(first.lineno, first.end_lineno + 1))
  return lines


def count(path: pathlib.Path) -> collections.Counter:
  source = path.read_text()
  docs = docstring_lines(source)
  kinds = collections.Counter()
  for number, line in enumerate(source.splitlines(), 1):
    text = line.strip()
    if not text:
      kinds["blank"] += 1
    elif number in docs:
      kinds["doc"] += 1
    elif text.startswith("#"):
      kinds["comment"] += 1
    else:
      kinds["code"] += 1
  return kinds


def main(prefixes):
  total = collections.Counter()
  for path in sorted(pathlib.Path("ultrajax").rglob("*.py")):
    if "configs" in path.parts or (prefixes and not str(path).startswith(tuple(prefixes))):
      continue
    kinds = count(path)
    total += kinds
    if prefixes:
      print(f"{kinds.total():6d} {path}")
  print(dict(total), "total", total.total())


if __name__ == "__main__":
  main(sys.argv[1:])
