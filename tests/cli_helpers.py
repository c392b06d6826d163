"""Calling a launch script's main() in process: its exit status and what it printed."""

import contextlib
import importlib.util
import io
from pathlib import Path


def load_main(script: Path, name: str):
    """The `main` of a launch script (launch/ is not a package, so it is loaded from its file)."""
    spec = importlib.util.spec_from_file_location(name, script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def run_main(main, *args) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `main([args...])`; argparse's SystemExit counts as a status."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()
