"""The distribution installs ONE import root, adatok_vlm, with tokenizer/generator/training under it.

Builds a real wheel from the repository, installs it with ``pip install --no-deps --target`` and
imports it from outside the repository (no second 6 GB venv needed)."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    for name in ("setup.py", "README.md", "adatok_vlm", "tokenizer", "generator", "training", "configs"):
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, src / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "--disable-pip-version-check", "-w", str(out), str(src)], check=True, timeout=300)
    wheels = list(out.glob("adatok_vlm-*.whl"))
    assert len(wheels) == 1
    return wheels[0]


def test_wheel_holds_only_the_adatok_vlm_root(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    roots = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert roots == {"adatok_vlm"}
    for sub in ("tokenizer", "generator", "training", "configs"):
        assert f"adatok_vlm/{sub}/__init__.py" in names


def test_wheel_ships_every_config_file(wheel):
    """``configs/`` is package data: every file of the checkout's folder is in the wheel, same place."""
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = sorted(f"adatok_vlm/configs/{p.relative_to(REPO / 'configs').as_posix()}"
                     for p in (REPO / "configs").rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert "adatok_vlm/configs/dit/dit-tiny.yaml" in shipped
    assert [n for n in shipped if n not in names] == []


def test_installed_wheel_imports_from_outside_the_repo(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--disable-pip-version-check",
                    "--target", str(target), str(wheel)], check=True, timeout=300)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "import adatok_vlm, adatok_vlm.tokenizer, adatok_vlm.generator, adatok_vlm.training;"
        "from adatok_vlm import AdaTokConfig, AdaTokModel;"
        "import transformers;"
        "assert transformers.AutoConfig.for_model('adatok').__class__ is AdaTokConfig;"
        "from adatok_vlm.training.config import configs_dir, load_yaml;"
        "from adatok_vlm.training.distributed import resolve_deepspeed_config;"
        "assert load_yaml(configs_dir() / 'dit' / 'dit-tiny.yaml');"
        "assert resolve_deepspeed_config('zero2')['zero_optimization']['stage'] == 2;"
        "print(adatok_vlm.__file__); print(adatok_vlm.tokenizer.__file__); print(adatok_vlm.training.__file__);"
        "print(configs_dir())"
    )
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    result = subprocess.run([sys.executable, "-c", code, str(target)], cwd=outside, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    files = result.stdout.split()
    assert len(files) == 4 and all(f.startswith(str(target)) for f in files), files


def test_cli_lists_every_verb_and_each_verb_resolves(capsys):
    """``adatok --help`` names every verb, and each verb's ``--help`` reaches its own argument parser
    (an import error or a miswired verb fails here, not in a user's shell)."""
    from adatok_vlm.cli import VERBS, main

    assert main(["--help"]) == 0
    listed = capsys.readouterr().out
    for verb in VERBS:
        assert verb in listed
    for verb in sorted(set(VERBS) - {"ablation", "demo"}):
        with pytest.raises(SystemExit) as exc:
            main([verb, "--help"])
        assert exc.value.code == 0, verb
        assert "usage" in capsys.readouterr().out.lower(), verb
    assert main(["no-such-verb"]) == 2
    with pytest.raises(SystemExit, match="--generator"):
        main(["sample-c2i", "--generator", "gan", "--dit", "x"])
