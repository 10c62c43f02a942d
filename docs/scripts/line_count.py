"""Lines under ultrajax/ (issue 16's measure), split into code, docstring, comment and blank lines.

  python docs/scripts/line_count.py [path prefix ...]   (from a checkout's root; with prefixes:
                                                          those files, one line each)
  python docs/scripts/line_count.py --issue16            (the filing's count, rebuilt as below,
                                                          against today's with and without the
                                                          modules later issues added)

Every .py file under ultrajax/ except the configs symlink, i.e. the same total as
`git ls-files ultrajax | grep '\\.py$' | xargs cat | wc -l`. The filing's count (21,335) is
a9d1934's tree formatted with today's ruff configuration: `git archive a9d1934 ultrajax
pyproject.toml | tar -x -C DIR`, copy today's pyproject.toml over it, `ruff format DIR/ultrajax`.
"""

import ast
import collections
import pathlib
import shutil
import subprocess
import sys
import tempfile

FILING = "a9d1934"  # the tree when issue 16 was filed
# Modules that issues filed after 16 added and that have no counterpart in the filing's tree
# (each one's first commit names its issue). Lines those issues added to existing files stay in.
LATER = {
  "ultrajax/bench/plan.py": 17,
  "ultrajax/bench/pipeline.py": 17,
  "ultrajax/fed/protected.py": 20,
  "ultrajax/eval/benefit.py": 20,
  "ultrajax/jobs/benefit.py": 20,
  "ultrajax/viz/benefit.py": 20,
  **{f"ultrajax/fl/{name}.py": 21 for name in
     ("__init__", "client", "local", "params", "secure", "server", "site", "worker")},
}


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


def files(root: pathlib.Path):
  """The counted files under root/ultrajax (the configs symlink left out)."""
  return [p for p in sorted((root / "ultrajax").rglob("*.py")) if "configs" not in p.parts]


def issue16():
  with tempfile.TemporaryDirectory() as tmp:
    archive = subprocess.run(["git", "archive", FILING, "ultrajax"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
    shutil.copy("pyproject.toml", tmp)
    subprocess.run(["ruff", "format", "-q", f"{tmp}/ultrajax"], check=True)
    filing = sum(count(p).total() for p in files(pathlib.Path(tmp)))
  now = {str(p): count(p).total() for p in files(pathlib.Path("."))}
  missing = sorted(set(LATER) - set(now))
  if missing:
    sys.exit(f"LATER names files that are gone: {missing}")
  later = sum(now[p] for p in LATER)
  print(f"{FILING} (filing), today's ruff format: {filing:6d}")
  print(f"today, every module:                  {sum(now.values()):6d}")
  for issue in sorted(set(LATER.values())):
    print(f"  modules issue {issue} added:            {sum(now[p] for p in LATER if LATER[p] == issue):6d}")
  print(f"today without them:                   {sum(now.values()) - later:6d}"
        f"  ({sum(now.values()) - later - filing:+d} against the filing)")


def main(prefixes):
  if prefixes == ["--issue16"]:
    return issue16()
  total = collections.Counter()
  for path in files(pathlib.Path(".")):
    if prefixes and not str(path).startswith(tuple(prefixes)):
      continue
    kinds = count(path)
    total += kinds
    if prefixes:
      print(f"{kinds.total():6d} {path}")
  print(dict(total), "total", total.total())


if __name__ == "__main__":
  main(sys.argv[1:])
