"""Execute a notebook headless, keeping every output: the body of a batch notebook job.

Parameters are injected papermill-style: a cell holding the assignments is
inserted after the cell tagged ``parameters`` (or first, if there is none),
tagged ``injected-parameters``. The executed notebook, with its outputs and
any traceback, is written beside the input, never over it. The exit status
is 0 only when every cell ran. When Slurm stops the job (walltime,
``scancel``: SIGTERM, then SIGKILL after ``KillWait``), the notebook is
written at once with the outputs produced so far and a note saying so, and
the status is 143.

Run: ``python -m mspass_cluster.notebook IN.ipynb [--output OUT.ipynb] [--param key=value ...]``
"""

from __future__ import annotations

import argparse
import ast
import os
import signal
import sys
import time

__all__ = ["parse_params", "inject_parameters", "execute", "default_output_path", "read_notebook", "parameter_names"]


def parse_params(items: list[str]) -> dict:
    """``["n=3", "name=TA"]`` gives ``{"n": 3, "name": "TA"}``: Python literals, else strings.

    Raises
    ------
    ValueError
        For an item without ``=`` or with a name that is not an identifier.
    """
    params = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--param {item!r} is not name=value, e.g. --param nodes=4")
        try:
            params[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            params[key] = text
    return params


def read_notebook(path: str):
    """Read the notebook at ``path`` as nbformat 4 and check it against the notebook schema.

    Parameters
    ----------
    path : str
        The notebook file.

    Returns
    -------
    nbformat.NotebookNode
        The notebook, as the batch job will read it.

    Raises
    ------
    ValueError
        When the file cannot be read, is not JSON, is not a notebook, or is
        not a valid one; the message names the file and what is wrong.
    """
    import nbformat

    try:
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
    except OSError as exc:
        raise ValueError(f"{path!r} cannot be read: {exc.strerror or exc}.") from exc
    except nbformat.reader.NotJSONError as exc:
        raise ValueError(f"{path!r} is not a notebook: it is not JSON (it starts {_head(path)!r}).") from exc
    except (nbformat.ValidationError, ValueError, KeyError, TypeError, AttributeError) as exc:
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path!r} is not a valid Jupyter notebook: {why}.") from exc
    return notebook


def _head(path: str, size: int = 40) -> str:
    with open(path, "rb") as f:
        return f.read(size).decode(errors="replace")


def parameter_names(notebook) -> list[str] | None:
    """Names the cell tagged ``parameters`` assigns, in order; None when no cell has that tag.

    Magics (``%matplotlib``, ``!ls``) are allowed in the cell when IPython is
    installed, as in a notebook.

    Raises
    ------
    ValueError
        When the ``parameters`` cell is not Python.
    """
    cell = next((c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])), None)
    if cell is None:
        return None
    source = cell.source
    try:
        from IPython.core.inputtransformer2 import TransformerManager
    except ImportError:
        pass
    else:
        source = TransformerManager().transform_cell(source)
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        raise ValueError(
            f"the cell tagged 'parameters' is not Python (line {exc.lineno}: {exc.msg}); it should hold "
            "plain assignments such as 'year = 2012'."
        ) from exc
    names = []

    def add(target):
        if isinstance(target, ast.Name):
            names.append(target.id)
        elif isinstance(target, (ast.Tuple, ast.List)):
            for element in target.elts:
                add(element)
        elif isinstance(target, ast.Starred):
            add(target.value)

    for node in tree.body:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                add(target)
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            add(node.target)
    return list(dict.fromkeys(names))


def inject_parameters(notebook, params: dict) -> None:
    """Insert a cell assigning ``params`` after the ``parameters`` cell (in place)."""
    import nbformat

    if not params:
        return
    source = "# Parameters\n" + "\n".join(f"{k} = {v!r}" for k, v in params.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    index = next((i + 1 for i, c in enumerate(notebook.cells) if "parameters" in c.metadata.get("tags", [])), 0)
    notebook.cells.insert(index, cell)


def default_output_path(input_path: str, job_id: str | None = None) -> str:
    """``flow.ipynb`` gives ``flow-<job id>.ipynb`` (``flow-executed.ipynb`` outside Slurm)."""
    root, _ = os.path.splitext(input_path)
    return f"{root}-{job_id or os.environ.get('SLURM_JOB_ID') or 'executed'}.ipynb"


class _Terminated(Exception):
    """SIGTERM arrived (Slurm's walltime or ``scancel``)."""


def _in_chain(exc: BaseException | None, kind: type) -> BaseException | None:
    """``exc`` or the first exception it was raised while handling that is a ``kind``."""
    while exc is not None and not isinstance(exc, kind):
        exc = exc.__context__
    return exc


def execute(input_path: str, output_path: str, params: dict, timeout: float | None = None) -> int:
    """Run every cell; write the executed notebook; return 0 if all ran, 1 if a cell failed, 143 if stopped."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, DeadKernelError

    notebook = nbformat.read(input_path, as_version=4)
    inject_parameters(notebook, params)
    client = NotebookClient(
        notebook,
        timeout=timeout,
        kernel_name=notebook.metadata.get("kernelspec", {}).get("name", "python3"),
        resources={"metadata": {"path": os.path.dirname(os.path.abspath(input_path))}},
    )
    status = 0
    terminated = []

    def raise_terminated(signum, frame):
        terminated.append(signum)
        raise _Terminated(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        client.execute()
    except CellExecutionError as exc:
        print(f"mspass_cluster: notebook {input_path} failed:\n{exc}", file=sys.stderr, flush=True)
        status = 1
    except Exception as exc:
        # Slurm signals every process of the job: the kernel may go first (DeadKernelError), and
        # nbclient's own clean-up may fail on the way out and hide the SIGTERM.
        dead_kernel = _in_chain(exc, DeadKernelError)
        if not (terminated or dead_kernel):
            raise
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the outputs are written first, whatever else arrives
        why = "SIGTERM" if terminated else f"the kernel's death ({dead_kernel})"
        stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        notebook.cells.append(
            nbformat.v4.new_markdown_cell(
                f"**mspass_cluster:** execution was stopped by {why} at {stamp} (Slurm's walltime, `scancel`, or "
                "a node going down). The outputs above are those produced until then."
            )
        )
        print(f"mspass_cluster: notebook {input_path} stopped by {why}", file=sys.stderr, flush=True)
        status = 128 + signal.SIGTERM
    finally:
        nbformat.write(notebook, output_path)
        print(f"mspass_cluster: executed notebook written to {output_path}", flush=True)
        signal.signal(signal.SIGTERM, previous)
    return status


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mspass_cluster.notebook", description=__doc__.split("\n\n")[0])
    parser.add_argument("notebook")
    parser.add_argument("--output", help="executed notebook (default: <name>-<job id>.ipynb beside the input)")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        params = parse_params(args.param)
    except ValueError as exc:
        parser.error(str(exc))
    return execute(args.notebook, args.output or default_output_path(args.notebook), params)


if __name__ == "__main__":
    sys.exit(main())
