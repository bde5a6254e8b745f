"""A new user's view: crossvlm built from a clean copy of the tree (what git holds, outside this
checkout), installed as a package, and used from a folder that holds neither.

`.ci/run` goes further on every CI run: it clones the repository, makes a new virtual environment
and runs the README's set-up commands in it word for word (the install, the demo, the tests).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def _clean_copy(dest: Path) -> None:
    """The files git holds or would add (tracked, and new files not ignored): no build output, no runs."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_symlink() or src.is_file():  # a tracked file deleted in the working tree is skipped
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel, follow_symlinks=False)


@pytest.mark.slow
def test_the_installed_package_works_outside_any_checkout(tmp_path):
    source, prefix, elsewhere = tmp_path / "crossvlm", tmp_path / "installed", tmp_path / "elsewhere"
    _clean_copy(source)
    # Built and installed the way `pip install` does it (a wheel, not editable) under a prefix of its
    # own, so a file the package misses is missing. Its dependencies are this interpreter's (.ci/run has
    # installed them, torch included, into the environment running the tests): a new virtual
    # environment would not see them and would reinstall torch, minutes and GBs for nothing this
    # test checks. --ignore-installed: without it pip uninstalls the crossvlm installed in this
    # environment (an editable one included) before writing the copy under the prefix.
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", "--prefix",
                    str(prefix), str(source)], check=True, capture_output=True)
    site_packages = next(prefix.glob("lib/python*/site-packages"))
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site_packages)}  # ahead of any crossvlm this interpreter has

    def run(*args: str) -> str:
        done = subprocess.run(list(args), cwd=elsewhere, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"{' '.join(args)}\n{done.stdout}\n{done.stderr}"
        return done.stdout

    # The package in the venv is what runs, with every file git holds for it and every declared
    # dependency present.
    report = run(sys.executable, "-c", """if True:
        import importlib.metadata as md, pathlib, crossvlm
        from packaging.requirements import Requirement
        print(pathlib.Path(crossvlm.__file__).parent)
        for text in md.requires("crossvlm"):
            req = Requirement(text)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("all", "test")):
                name = req.name
                if name != "crossvlm":
                    assert req.specifier.contains(md.version(name), prereleases=True), (text, md.version(name))
        """)
    package = Path(report.splitlines()[0])
    assert package == site_packages / "crossvlm"
    tracked = [p for p in source.joinpath("crossvlm").rglob("*") if p.is_file()]
    missing = [str(p.relative_to(source)) for p in tracked if not (package / p.relative_to(source / "crossvlm")).exists()]
    assert not missing, f"files git holds that the installed package lacks: {missing}"

    # The README's training commands by stage name, from a folder that holds no configs.
    crossvlm = str(prefix / "bin" / "crossvlm")
    listed = run(crossvlm, "train", "--list").splitlines()
    assert [line.split()[0] for line in listed] == ["debug", "demo_pretrain", "demo_sft", "pretrain", "sft"]
    (elsewhere / "d.parquet").write_bytes(b"")
    printed = run(crossvlm, "train", "sft", "--data.sources", "[d.parquet]", "--print-config")
    assert "init_from: runs/pretrain/final" in printed and "path: d.parquet" in printed
