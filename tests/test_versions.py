"""The oldest torch and diffusers ditas runs on are checked in one line, before any work."""

import pytest

import ditas.versions as versions
from ditas.cli.main import main
from ditas.errors import DitasError
from ditas.versions import MIN_VERSIONS, _release, check_versions, version_problem


def test_release_parts():
    assert _release("2.13.0+cpu") == (2, 13, 0)
    assert _release("2.14.0rc1") == (2, 14, 0)
    assert _release("0.42.1") == (0, 42, 1)
    assert _release("2.4.1") < (2, 13)


def test_installed_versions_pass_and_older_ones_are_named():
    check_versions()  # the environment the suite runs in is supported
    assert version_problem("torch", "2.13.0+cpu") is None
    problem = version_problem("torch", "2.4.1")
    assert "torch>=2.13" in problem and "2.4.1" in problem and "\n" not in problem
    assert "not installed" in version_problem("diffusers", None)
    assert set(MIN_VERSIONS) == {"torch", "diffusers"}


def test_pyproject_floors_are_the_checked_ones():
    import tomllib
    from pathlib import Path

    deps = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
    for name, floor in MIN_VERSIONS.items():
        assert f"{name}>={'.'.join(map(str, floor))}" in [d.split(" ")[0].split(",")[0] for d in deps], name


def test_a_command_with_an_old_diffusers_stops_in_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(versions, "installed_version", lambda name: {"torch": "2.13.0", "diffusers": "0.30.0"}[name])
    assert main(["sample", "--classes", "1", "--steps", "2", "--out", str(tmp_path / "g.png")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "diffusers>=0.42" in err[0] and "0.30.0" in err[0]
    assert not (tmp_path / "g.png").exists()
    with pytest.raises(DitasError):
        check_versions("diffusers")
