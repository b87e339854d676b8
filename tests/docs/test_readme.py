"""README claims about the command line and the default recipe, checked against the repository."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_recipe_block_is_the_default_recipe_verbatim():
    """Copying the README's recipe must give what `make demo` runs (it once lacked `structure: UL-UM`)."""
    section = README[README.index("\n## Recipe\n"):]
    block = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert block is not None
    assert block.group(1) == (ROOT / "recipes" / "default.yaml").read_text()


def test_edgeprune_console_script_is_the_pipeline_main():
    # tomllib is Python 3.11+; the project supports 3.10, so the one line is read by pattern.
    section = (ROOT / "pyproject.toml").read_text().split("[project.scripts]\n", 1)[1].split("\n[", 1)[0]
    target = re.search(r'^edgeprune = "([\w.]+:\w+)"$', section, re.M)
    assert target is not None
    module, _, func = target.group(1).partition(":")
    main = getattr(importlib.import_module(module), func)
    assert main(["inspect", str(ROOT / "no-such-run")]) == 2  # one clear error line, exit 2, like the module


def test_usage_names_the_command_typed(tmp_path):
    """`edgeprune --help` says edgeprune, `python -m pipeline --help` says that."""
    script = tmp_path / "edgeprune"
    script.write_text("import sys\nfrom pipeline.__main__ import main\nsys.exit(main())\n")
    env_path = {"PYTHONPATH": str(ROOT)}
    as_script = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, env=env_path)
    as_module = subprocess.run([sys.executable, "-m", "pipeline", "--help"], capture_output=True, text=True,
                               env=env_path, cwd=ROOT)
    assert as_script.stdout.startswith("usage: edgeprune ") and as_module.stdout.startswith("usage: python -m pipeline ")


def test_cache_location_and_variable_are_documented(monkeypatch):
    from models.loading import cache_dir

    assert "`~/.cache/edgeprune/`" in README and "`PIPELINE_CACHE`" in README
    monkeypatch.delenv("PIPELINE_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "edgeprune"
    monkeypatch.setenv("PIPELINE_CACHE", "/somewhere/else")
    assert cache_dir() == Path("/somewhere/else")
