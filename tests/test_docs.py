"""The README documents every option, and CI runs the README's test command."""

from pathlib import Path

import mspass_cluster
from mspass_cluster.config import render_options_table

ROOT = Path(__file__).resolve().parent.parent


def test_readme_option_table_is_generated_from_the_declarations():
    # Regenerate with: python -m mspass_cluster.config
    assert render_options_table() in (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "| `ci/test` |" in readme and "| `ci/demo` |" in readme
    assert "exec ci/test" in (ROOT / ".ci" / "run").read_text()


def test_public_names_are_exactly_all():
    import inspect

    public = {n for n, v in vars(mspass_cluster).items() if not n.startswith("_") and not inspect.ismodule(v)}
    assert public == set(mspass_cluster.__all__) - {"__version__"}
