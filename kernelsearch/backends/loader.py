"""Importing generated files: what `kernelsearch show` prints is what runs.

A generated file (codegen/files.py) is written once to the cache under its own name - the
fingerprint of the folded graph is in it - and imported from there as a module of that name, so
tracebacks, `inspect` (Triton's @jit reads its function's source) and a reader all see the same
bytes. The cache is `$KERNELSEARCH_CACHE_DIR/generated`, else `~/.cache/kernelsearch/generated`
(`$XDG_CACHE_HOME` respected), else a per-user folder in the temp dir.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from pathlib import Path

from ..codegen.files import GeneratedFile


def cache_dir() -> Path:
    root = os.environ.get("KERNELSEARCH_CACHE_DIR")
    if root:
        path = Path(root) / "generated"
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = Path(base) / "kernelsearch" / "generated"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        path = Path(tempfile.gettempdir()) / f"kernelsearch-{os.getuid()}" / "generated"
        path.mkdir(parents=True, exist_ok=True)
    return path


def write(file: GeneratedFile) -> Path:
    """The file's path in the cache, (re)written atomically unless it already holds these bytes."""
    path = cache_dir() / file.filename
    try:
        current = path.read_text()
    except (OSError, UnicodeDecodeError):
        current = None
    if current != file.source:
        tmp = path.with_name(f".{file.filename}.{os.getpid()}.tmp")
        tmp.write_text(file.source)
        os.replace(tmp, path)
    return path


def import_file(file: GeneratedFile, module_name: str | None = None):
    """Import a generated file from the cache, once per process and module name (a caller that
    needs two imports of one file, e.g. Triton compiled and interpreted, gives two names)."""
    name = f"kernelsearch_generated_{module_name or file.module}"
    module = sys.modules.get(name)
    if module is not None:
        return module
    path = write(file)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module
