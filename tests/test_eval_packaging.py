"""A non-editable install evaluates: ``eval/`` (judge prompts, annotator configs, data manifest) ships in the wheel as
``treg._eval`` and is found through the package, from a working directory outside the repository; the manifest names
no machine-specific root; pyproject's explicit package list covers every treg subpackage."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from treg.evaluation import data

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_pyproject_packages_cover_every_treg_subpackage_and_map_eval():
    setuptools = _pyproject()["tool"]["setuptools"]
    found = {
        ".".join(p.relative_to(ROOT).parent.parts)
        for p in (ROOT / "treg").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert found <= set(setuptools["packages"]), f"add {sorted(found - set(setuptools['packages']))} to pyproject"
    assert setuptools["package-dir"] == {"treg._eval": "eval"} and "treg._eval" in setuptools["packages"]


def test_manifest_roots_are_env_package_or_relative():
    with open(ROOT / "eval" / "data.yaml") as f:
        roots = yaml.safe_load(f)["roots"]
    assert roots[0] == "${TREG_EVAL_DATA}"
    assert not any(os.path.isabs(r) for r in roots), roots


def test_relative_roots_are_taken_from_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("TREG_EVAL_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    # ../shared/data from the working directory, then shared/data beside the checkout holding treg
    checkout = str((ROOT.parent / "shared" / "data").resolve())
    assert data.checkout_data_root() == checkout
    assert data.data_roots() == [str(tmp_path.parent / "shared" / "data"), checkout]
    monkeypatch.chdir(ROOT)  # the two are the same folder: listed once
    assert data.data_roots() == [checkout]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TREG_EVAL_DATA", str(tmp_path / "d"))
    assert data.data_roots()[0] == str(tmp_path / "d")
    with pytest.raises(data.DataNotFound, match="TREG_EVAL_DATA=.* is not a directory"):
        data.resolve("alpaca-eval/x.json", "--reference-outputs")


def test_find_root_takes_the_first_root_holding_a_file_or_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d" / "hh").mkdir(parents=True)
    (tmp_path / "d" / "hh" / "pairs.jsonl").write_text("{}\n")
    monkeypatch.setenv("TREG_EVAL_DATA", str(tmp_path / "d"))
    assert data.find_root("hh") == str(tmp_path / "d")
    assert data.resolve("hh/pairs.jsonl") == str(tmp_path / "d" / "hh" / "pairs.jsonl")
    with pytest.raises(data.DataNotFound) as e:
        data.resolve("hh/absent.jsonl")
    assert str(tmp_path / "d" / "hh" / "absent.jsonl") in str(e.value) and "pass " not in str(e.value)
    with pytest.raises(data.DataNotFound, match="pass --pairs PATH"):
        data.resolve("hh/absent.jsonl", "--pairs")
    name = data.manifest()["hh_rlhf"]["harmless_base_test"]
    (tmp_path / "d" / name).write_text("")
    assert data.hh_rlhf_test() == str(tmp_path / "d" / name) and data.hh_rlhf_test("x.jsonl") == "x.jsonl"


def test_assets_come_from_the_package_or_the_checkout():
    path = data.assets_dir()
    assert os.path.isfile(os.path.join(path, "data.yaml"))
    assert os.path.isfile(data.asset("arena_hard", "arena-hard-v0.1.yaml"))
    assert os.path.samefile(path, ROOT / "eval")  # editable or source checkout: the one copy, eval/


def _copy_source(dst: Path) -> None:
    """The files a build reads, copied so that building leaves nothing (build/, *.egg-info) in the repository."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("treg", "eval"):
        shutil.copytree(ROOT / name, dst / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, dst / name)


def test_editable_install_maps_eval_as_the_assets_package(tmp_path):
    """What `pip install -e .` installs (setuptools' editable wheel) finds eval/ of the source tree as treg._eval."""
    src, site = tmp_path / "src", tmp_path / "site"
    _copy_source(src)
    build = "from setuptools import build_meta as b; print(b.build_editable(__import__('sys').argv[1]))"
    done = subprocess.run(
        [sys.executable, "-c", build, str(tmp_path)], cwd=src, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    shutil.unpack_archive(tmp_path / done.stdout.split()[-1], site, format="zip")
    deps = os.path.dirname(os.path.dirname(yaml.__file__))
    # -S: none of this interpreter's own .pth files (the repository's editable install), only the wheel's; its
    # site dir goes first, as the dependencies' folder holds a finder module of the same name
    probe = (
        "import site, sys; site.addsitedir(sys.argv[2]); sys.path.append(sys.argv[1]); import treg._eval; "
        "from treg.evaluation import data; print(treg._eval.__file__); print(data.assets_dir())"
    )
    done = subprocess.run(
        [sys.executable, "-S", "-c", probe, deps, str(site)], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-3000:]
    init, assets = done.stdout.split()
    assert Path(init) == src / "eval" / "__init__.py" and Path(assets) == src / "eval"


def test_non_editable_install_runs_arena_hard_outside_the_repository(tmp_path, tiny):
    from test_eval_e2e import write_data_root

    src, site, work = tmp_path / "src", tmp_path / "site", tmp_path / "work"
    _copy_source(src)
    work.mkdir()
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
    built = subprocess.run([*pip, "--target", str(site), str(src)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    assert (site / "treg" / "_eval" / "data.yaml").is_file()
    assert (site / "treg" / "_eval" / "alpaca_eval" / "treg_weighted_endpoint" / "configs.yaml").is_file()

    env = dict(os.environ, PYTHONPATH=str(site), TREG_EVAL_DATA=write_data_root(str(tmp_path / "data"), n=2))
    env.pop("PYTHONSAFEPATH", None)

    def run(*args, timeout=300):
        done = subprocess.run(
            [sys.executable, *args], cwd=work, env=env, capture_output=True, text=True, timeout=timeout
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        return done.stdout

    where = run("-c", "import treg; from treg.evaluation import data; print(treg.__file__); print(data.assets_dir())")
    treg_file, assets = where.split()
    assert Path(treg_file).is_relative_to(site) and Path(assets) == site / "treg" / "_eval"
    assert "--judge-config" in run("-m", "treg", "eval", "arena-hard", "--help")
    out = run(
        "-m",
        "treg",
        "eval",
        "arena-hard",
        "--model",
        "treg:tiny",
        "--judge",
        "treg:tiny",
        "--max-instances",
        "2",
        "--max-new-tokens",
        "8",
        "--rounds",
        "5",
        "--quiet",
    )
    run_dir = work / "eval_results" / "arena_hard_v0.1" / "tiny"
    assert (run_dir / "results.json").is_file() and (run_dir / "model_judgment" / "treg_tiny" / "tiny.jsonl").is_file()
    assert "re-score: treg eval arena-hard show --judgments" in out
    assert "tiny" in run("-m", "treg", "eval", "arena-hard", "show", "--judgments", str(run_dir), "--rounds", "5")
