"""The docs cannot go stale: the site builds strictly, the reference pages are what the code generates, every
error code raised is documented (and every documented one raised), every setting, `python -m` module and file
the docs name exists, every curl shows the server's errors, and the README stays a short, undated front page."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys

from serve_app.core import errors
from serve_app.core.constants import PROJECT_ROOT
from serve_app.core.settings import RENAMED_SETTINGS, Settings
from serve_app.tools import docs
from tests.support.docs import DOCS, code_blocks, commands, first_request, pages

README = PROJECT_ROOT / "README.md"
# Variables the docs name that are not our settings: Ray's, the hub's, the control script's, OpenClaw's.
OTHER_VARIABLES = {
    "ENV_FILE",
    "HF_HUB_OFFLINE",
    "SESAME_TTS_SERVICE",
    "START_TIMEOUT",
    "STOP_TIMEOUT",
    "OPENAI_TTS_BASE_URL",
    "NO_MKDOCS_2_WARNING",
    "ERROR_CODES",  # the table the error page is generated from
    "GRPC_VERBOSITY",
    "TEST_WORKERS",  # ./ops/test.sh's workers
}
PATH = re.compile(r"(?<![\w/.~-])((?:serve_app|ops|tests|voices|docs|results|\.ci)/[\w./-]*)")


def text_of_every_page() -> str:
    return "\n".join(page.read_text() for page in pages())


def test_the_site_builds_strictly(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", "docs/mkdocs.yml", "-d", str(tmp_path / "site")],
        cwd=PROJECT_ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "configuration" / "index.html").exists()


def test_the_reference_pages_are_what_the_code_generates():
    assert docs.stale() == [], "run `python -m serve_app.tools.docs --write`"
    page = (DOCS / "reference" / "configuration.md").read_text()
    for name, field in Settings.model_fields.items():  # every setting, with its docstring
        assert f"| `{name.upper()}` |" in page and field.description, name


def raised_error_codes() -> dict[str, list[str]]:
    """Every error code the server can raise, read from its source (tools/ is not the server): the `code=` of
    each error built, and the class's own code where an error is built without one. Code -> where."""
    defaults = {cls.__name__: cls.default_code for cls in _error_classes(errors.APIError)}
    found: dict[str, list[str]] = {}
    tools = PROJECT_ROOT / "serve_app" / "tools"
    for path in sorted(p for p in (PROJECT_ROOT / "serve_app").rglob("*.py") if tools not in p.parents):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            where = f"{path.relative_to(PROJECT_ROOT)}:{node.lineno}"
            code = next((k.value for k in node.keywords if k.arg == "code"), None)
            if code is not None:
                for constant in ast.walk(code):
                    if isinstance(constant, ast.Constant) and isinstance(constant.value, str):
                        found.setdefault(constant.value, []).append(where)
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if name in defaults:
                found.setdefault(defaults[name], []).append(where)
    return found


def _error_classes(cls) -> list[type]:
    return [cls, *(c for sub in cls.__subclasses__() for c in _error_classes(sub))]


def test_every_error_code_raised_is_documented_and_every_documented_one_is_raised():
    raised = raised_error_codes()
    assert not set(raised) - set(errors.ERROR_CODES), {c: raised[c] for c in set(raised) - set(errors.ERROR_CODES)}
    assert not set(errors.ERROR_CODES) - set(raised), "documented but never raised"
    page = (DOCS / "reference" / "errors.md").read_text()
    assert all(f"`{code}`" in page for code in raised)


def test_every_setting_the_docs_name_exists():
    settings = {name.upper() for name in Settings.model_fields} | set(RENAMED_SETTINGS)
    named = set(re.findall(r"\b[A-Z][A-Z0-9]+(?:_[A-Z0-9]+)+\b", text_of_every_page()))
    unknown = {n for n in named - settings - OTHER_VARIABLES if not n.startswith(("RAY_", "MLX_MAX_", "HF_"))}
    assert not unknown, f"the docs name settings that do not exist: {sorted(unknown)}"
    assert {n for n in named if n.startswith("HF_")} <= settings | OTHER_VARIABLES


def test_every_python_module_the_docs_name_exists():
    named = set(re.findall(r"python -m ([A-Za-z_][\w.]*)", text_of_every_page()))
    assert "serve_app.tools.tiny_checkpoint" in named
    missing = [name for name in sorted(named) if importlib.util.find_spec(name) is None]
    assert not missing, f"the docs run modules that do not exist: {missing}"


def test_every_file_the_docs_name_exists():
    named = {m.rstrip(".,:;)") for m in PATH.findall(text_of_every_page())}
    missing = sorted(p for p in named if not (PROJECT_ROOT / p).exists())
    assert not missing, f"the docs name files that do not exist: {missing}"


def test_every_curl_in_the_docs_shows_the_servers_errors():
    """Without --fail-with-body curl saves a 503's JSON as the audio file and exits 0."""
    found = []
    for page in pages():
        text = page.read_text()
        found += [c for block in code_blocks(page) for c in commands(block) if re.search(r"(^|[|&;(]\s*)curl ", c)]
        found += re.findall(r"`(curl [^`]*)`", text)
    assert len(found) > 5
    assert not [c for c in found if "--fail-with-body" not in c]


def test_the_readme_is_a_short_undated_front_page():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", text), "dates belong in results/"
    assert not re.search(r"\bissue \d+|#\d+\b|\b[0-9a-f]{7,40}\b", text), "commit ids and issue numbers too"
    assert tuple(commands(code_blocks(README)[0])[i].split()[0] for i in (0, 1)) == ("./ops/serve.sh", "./ops/test.sh")
    assert first_request() in [c for block in code_blocks(README) for c in commands(block)]


def test_ci_runs_the_readmes_test_command():
    test_command = commands(code_blocks(README)[0])[1]  # the README's second command: the tests
    assert (PROJECT_ROOT / ".ci" / "run").read_text().strip().splitlines()[-1] == test_command
