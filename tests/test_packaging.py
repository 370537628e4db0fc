"""backends/ ships inside the library as ``xpmlp.backends``, never as a top-level ``backends``."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Not part of a build: environments, build output, run output, data, tests.
SKIP = {".git", ".venv", "venv", "build", "dist", "runs", "data", "tests", "experiments",
        ".pytest_cache"}


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(extra)
    return env


def run_python(code, cwd, **env):
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=clean_env(**env),
                          capture_output=True, text=True, timeout=120)


def copy_source(dest):
    """The source tree without build leftovers, so a stale build/ can't leak into the wheel."""
    dest.mkdir()
    for entry in REPO.iterdir():
        if entry.name in SKIP or entry.name.endswith(".egg-info"):
            continue
        if entry.is_dir():
            shutil.copytree(entry, dest / entry.name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        else:
            shutil.copy2(entry, dest / entry.name)


def test_wheel_ships_backends_inside_xpmlp(tmp_path):
    src, dist, unpacked, elsewhere = (tmp_path / d for d in ("src", "dist", "unpacked", "elsewhere"))
    copy_source(src)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-q", "-w", str(dist), str(src)],
        capture_output=True, text=True, timeout=300, env=clean_env(PIP_DISABLE_PIP_VERSION_CHECK="1"))
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = dist.glob("xpmlp-*.whl")

    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        zf.extractall(unpacked)
        top_level = next(zf.read(n).decode() for n in names if n.endswith(".dist-info/top_level.txt"))
        entry_points = next(zf.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
        metadata = next(zf.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
        licence = [zf.read(n).decode() for n in names if ".dist-info/" in n and n.endswith("/LICENSE")]
    for module in sorted(p.name for p in (REPO / "backends").glob("*.py")):
        assert f"xpmlp/backends/{module}" in names
    for module in sorted(p.relative_to(REPO).as_posix() for p in (REPO / "xpmlp").rglob("*.py")):
        assert module in names
    tops = {n.split("/")[0] for n in names}
    assert not any(n.startswith("backends/") for n in names), sorted(tops)
    assert tops - {"xpmlp"} == {wheel.name.split("-py")[0] + ".dist-info"}, sorted(tops)
    assert top_level.split() == ["xpmlp"]
    assert "xpmlp = xpmlp.cli:main" in entry_points
    # Whoever installs it can tell whether they may use it: MIT, said twice and shipped.
    assert "License: MIT" in metadata.splitlines() and "Classifier: License :: OSI Approved :: MIT License" in metadata
    assert licence == [(REPO / "LICENSE").read_text()] and licence[0].startswith("MIT License")

    # Importable from the unpacked wheel alone, from a directory holding no source.
    elsewhere.mkdir()
    code = ("import sys, xpmlp, xpmlp.backends\n"
            "print(xpmlp.__file__); print(xpmlp.backends.__file__)\n"
            "b = xpmlp.get_backend('numpy')\n"
            "m = xpmlp.build_model('mlp1-relu-sce', backend=b)\n"
            "import numpy as np\n"
            "assert m.forward(b.asarray(np.zeros((2, 784), dtype=np.float32))).shape == (2, 10)\n"
            "try:\n    import backends\nexcept ModuleNotFoundError:\n    pass\n"
            "else:\n    sys.exit('top-level backends importable: ' + backends.__file__)\n")
    result = run_python(code, elsewhere, PYTHONPATH=str(unpacked))
    assert result.returncode == 0, result.stdout + result.stderr
    files = [Path(line) for line in result.stdout.split()]
    assert files == [unpacked / "xpmlp" / "__init__.py", unpacked / "xpmlp" / "backends" / "__init__.py"]


def test_installed_package_has_no_top_level_backends(tmp_path):
    """The install the tests run against (editable in development) maps the same way."""
    code = ("import xpmlp.backends\n"
            "from xpmlp.backends import get_backend\n"
            "print(xpmlp.backends.__file__)\n"
            "try:\n    import backends\nexcept ModuleNotFoundError as exc:\n    print(exc.name)\n"
            "else:\n    raise SystemExit('top-level backends importable: ' + backends.__file__)\n")
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    backends_file, missing = result.stdout.split()
    assert Path(backends_file).parent.name == "backends" and missing == "backends"


def test_cli_and_sweep_check_settings_without_the_training_loop(tmp_path):
    """Parsing and validating settings (the CLI, the sweep, the run directory) must not pull in
    the training loop: TrainConfig lives in its own module."""
    code = ("import sys, xpmlp.cli, xpmlp.sweep, xpmlp.rundir\n"
            "xpmlp.cli.config_from_args(xpmlp.cli.build_parser().parse_args(['train', '--lr', '0.1']))\n"
            "print(sorted(m for m in ('xpmlp.training.train', 'xpmlp.bench', 'tqdm') if m in sys.modules))\n")
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split() == ["[]"]


def test_metadata_says_mit_and_ships_the_licence(tmp_path):
    """Whoever installs xpmlp can tell whether they may use it (setuptools' own metadata
    step: it needs no `wheel` package, unlike the wheel build above)."""
    src = tmp_path / "src"
    copy_source(src)
    result = subprocess.run([sys.executable, "-c", "from setuptools import setup; setup()", "-q", "egg_info",
                             "--egg-base", str(tmp_path)], cwd=src, capture_output=True, text=True, timeout=120,
                            env=clean_env())
    assert result.returncode == 0, result.stdout + result.stderr
    info = (tmp_path / "xpmlp.egg-info")
    metadata = (info / "PKG-INFO").read_text().splitlines()
    assert "License: MIT" in metadata and "Classifier: License :: OSI Approved :: MIT License" in metadata
    assert "License-File: LICENSE" in metadata and "LICENSE" in (info / "SOURCES.txt").read_text().split()
    assert (REPO / "LICENSE").read_text().startswith("MIT License")
