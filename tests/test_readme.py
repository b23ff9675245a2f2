"""The README's test command is the one CI runs."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    (command,) = re.findall(r"^python3 -m venv .*pytest.*$", readme, flags=re.M)
    setup, install, test = command.split(" && ")
    assert setup == "python3 -m venv .venv"
    for step in (setup, install.replace("-r requirements.txt", "-q -r requirements.txt"), test):
        assert step in ci.splitlines(), f"{step!r} is in README.md but not in .ci/run"
