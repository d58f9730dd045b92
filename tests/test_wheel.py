"""A wheel is a working install.

The wheel is built from a copy of the source tree (setuptools' build/ folder would
otherwise keep files deleted from the tree), installed into a fresh virtual environment
that borrows this environment's requirements through a .pth file (torch and the rest are
not installed twice, nothing is downloaded), and run from a folder outside the checkout:
`quantkit recipes` lists the shipped recipes, the tiny model is quantized and evaluated on
the bundled corpora, and the CUDA sources, the recipes and the corpora are found inside
the installed package.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ["pyproject.toml", "README.md", "quantkit", "recipes", "csrc", "calibration"]


def _pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((REPO / "pyproject.toml").read_text("utf-8"))


def _data_files() -> list[str]:
    """The files that must ship as package data, as paths inside the wheel."""
    out = [f"quantkit/recipes/{p.relative_to(REPO / 'recipes').as_posix()}" for p in (REPO / "recipes").rglob("*.yaml")]
    out += [f"quantkit/csrc/{p.name}" for p in (REPO / "csrc").iterdir() if p.suffix in (".cu", ".cuh", ".json")]
    corpora = json.loads((REPO / "calibration" / "datasets.json").read_text("utf-8"))
    out += [f"quantkit/data/calibration/{name}" for name in
            ["datasets.json", "README.md", "LICENSES.txt", *(entry["file"] for entry in corpora.values() if "file" in entry)]]
    return sorted(out)


def test_every_subpackage_is_listed_in_pyproject():
    # pyproject.toml lists the packages (package-dir maps the data folders into quantkit/)
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "quantkit").rglob("__init__.py")}
    assert not found - listed, f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"


def _run(args: list, cwd: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(map(str, args))} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the fresh environment's python, its site-packages, a clean environment for
    subprocesses, a folder outside the checkout to run in, the wheel's path)."""
    root = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(COLUMNS="200", PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONNOUSERSITE="1")
    src = root / "src"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
          "--wheel-dir", root / "dist", src], root, env)
    (wheel,) = (root / "dist").glob("quantkit-*.whl")

    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], root, env)
    python = venv / "bin" / "python"
    purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        root, env).stdout.strip())
    # this environment's site-packages, after the venv's own: requirements (and pip) come from there
    borrowed = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (purelib / "_borrowed_requirements.pth").write_text("".join(f"{p}\n" for p in borrowed))
    # --ignore-installed: the borrowed folders may hold quantkit's own (editable) install
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", wheel], root, env)
    work = root / "elsewhere"
    work.mkdir()
    return python, purelib, env, work, wheel


def test_wheel_holds_the_package_data(installed):
    *_, wheel = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [name for name in _data_files() if name not in names]
    assert not missing, f"not in the wheel: {missing}"
    assert not [n for n in names if n.startswith(("recipes/", "csrc/", "calibration/", "tests/", "scripts/"))]


def test_installed_package_finds_its_data(installed):
    python, purelib, env, work, _ = installed
    probe = (
        "import json, quantkit\n"
        "from quantkit import calibration, recipe, resources\n"
        "from quantkit.kernels import cuda\n"
        "print(json.dumps({'package': quantkit.__file__, 'csrc': str(cuda.CSRC), 'recipes': str(recipe.RECIPES_DIR),\n"
        "    'calibration': str(calibration.BUNDLED_DIR), 'resources': [str(resources.recipes_dir()),\n"
        "    str(resources.csrc_dir()), str(resources.calibration_dir())], 'corpora': calibration.bundled_datasets(),\n"
        "    'cu': sorted(p.name for p in cuda.CSRC.glob('*.cu')),\n"
        "    'kernel_source': len((cuda.CSRC / 'int_weight_mma.cu').read_text())}))\n"
    )
    found = json.loads(_run([python, "-c", probe], work, env).stdout)
    package = purelib / "quantkit"
    assert Path(found["package"]) == package / "__init__.py"
    assert found["csrc"] == str(package / "csrc")
    assert found["recipes"] == str(package / "recipes")
    assert found["calibration"] == str(package / "data" / "calibration")
    assert found["resources"] == [found["recipes"], found["csrc"], found["calibration"]]
    assert found["cu"] == sorted(p.name for p in (REPO / "csrc").glob("*.cu"))
    assert found["kernel_source"] > 0
    for name, entry in found["corpora"].items():
        for part in entry.get("mix", [name]):  # a mix ships as its parts
            assert (package / "data" / "calibration" / found["corpora"][part]["file"]).is_file(), (name, part)


def test_installed_cli_lists_quantizes_and_evaluates(installed, tiny_model_dir):
    python, _, env, work, _ = installed
    quantkit = python.parent / "quantkit"  # the console script the wheel installed
    listed = _run([quantkit, "recipes"], work, env).stdout
    for path in (REPO / "recipes").glob("*.yaml"):
        assert path.stem in listed

    out = work / "w4"
    report = json.loads(_run([quantkit, "quantize", tiny_model_dir, "--recipe", "w4a16-rtn", "--out", out,
                              "--num-samples", "4", "--seqlen", "32", "--json"], work, env).stdout)
    assert report["recipe"] == "w4a16-rtn" and report["layers"] == 14
    assert (out / "quantkit_manifest.json").is_file()

    # a shipped ablation by name, on data-free W8A8, from the installed recipes folder
    abl = work / "fp8"
    report = json.loads(_run([quantkit, "quantize", tiny_model_dir, "--recipe", "ablations/fp8-dynamic-rtn",
                              "--out", abl, "--num-samples", "4", "--seqlen", "32", "--json"], work, env).stdout)
    assert report["recipe"] == "fp8-dynamic-rtn"

    evaluated = json.loads(_run([quantkit, "eval", out, "--data", "austen-eval", "--data", "pydocs-eval",
                                 "--windows", "2", "--seqlen", "64", "--json"], work, env).stdout)
    rows = {row["data"]: row for row in evaluated["results"]}
    assert sorted(rows) == ["austen-eval", "pydocs-eval"]  # the bundled corpora, read from the installed package
    assert all(row["windows"] == 2 and row["perplexity"] > 1 for row in rows.values())
