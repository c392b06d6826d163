"""Running launch scripts in tests: main() in process, finished background runs, their JSONL output."""

import contextlib
import importlib.util
import io
import json
import subprocess
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


def finished(runs, name: str) -> subprocess.CompletedProcess:
    """The completed background run `name` of a dict of futures; it must have exited 0."""
    proc = runs[name].result()
    assert proc.returncode == 0, f"{name}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    return proc


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]
