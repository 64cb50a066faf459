"""What a tracker records about the machine and the code: system facts and load, packages, git, source.

Everything here is local: no function opens a network connection.
"""
from __future__ import annotations

import platform
import subprocess
import sys
import zipfile
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # src/anomalens
SNAPSHOT_NAME = "code.zip"
_SOURCE_SUFFIXES = {".py", ".yaml", ".yml", ".toml", ".cfg", ".txt", ".md"}


def system_info() -> dict[str, Any]:
    """Static facts about the machine and the software stack (logged once per run)."""
    import psutil
    import torch

    from .. import __version__

    info: dict[str, Any] = {
        "system/os": platform.platform(),
        "system/python": platform.python_version(),
        "system/torch": torch.__version__,
        "system/anomalens": __version__,
        "system/cpu": platform.processor() or platform.machine(),
        "system/cpu_count": psutil.cpu_count(logical=True) or 0,
        "system/ram_total_gb": round(psutil.virtual_memory().total / 2**30, 2),
        "system/gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
    }
    for i in range(info["system/gpu_count"]):
        info[f"system/gpu{i}"] = torch.cuda.get_device_name(i)
    return info


def system_metrics() -> dict[str, float]:
    """Current load: CPU (since the previous call), RAM, this process, GPU memory when a GPU is used."""
    import psutil
    import torch

    process = psutil.Process()
    out = {
        "system/cpu_percent": float(psutil.cpu_percent(interval=None)),
        "system/ram_used_percent": float(psutil.virtual_memory().percent),
        "system/process_rss_gb": process.memory_info().rss / 2**30,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i in range(torch.cuda.device_count()):
            out[f"system/gpu{i}_memory_gb"] = torch.cuda.memory_allocated(i) / 2**30
            out[f"system/gpu{i}_peak_memory_gb"] = torch.cuda.max_memory_allocated(i) / 2**30
    return out


@lru_cache(maxsize=1)  # scanning site-packages takes about a second; it does not change within a process
def installed_packages() -> tuple[str, ...]:
    """'name==version' for every installed distribution, sorted by name."""
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(name.lower(), dist.version)
    return tuple(f"{name}=={version}" for name, version in sorted(found.items()))


def git_info(start: Path | None = None) -> dict[str, str]:
    """Commit, branch and dirty flag of the repository holding `start` (the working directory, then
    the package source); empty when neither is in a git repository or git is not installed."""
    for where in ([Path(start)] if start else [Path.cwd(), PACKAGE_DIR]):
        commit = _git(where, "rev-parse", "HEAD")
        if commit:
            return {"git/commit": commit, "git/branch": _git(where, "rev-parse", "--abbrev-ref", "HEAD") or "",
                    "git/dirty": str(bool(_git(where, "status", "--porcelain", "--untracked-files=no"))).lower(),
                    "git/root": _git(where, "rev-parse", "--show-toplevel") or ""}
    return {}


def _git(where: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def source_files() -> list[tuple[Path, str]]:
    """(file, name in the snapshot): the anomalens package source, plus the user's script if one is running."""
    files = [(p, f"anomalens/{p.relative_to(PACKAGE_DIR).as_posix()}") for p in sorted(PACKAGE_DIR.rglob("*"))
             if p.is_file() and p.suffix in _SOURCE_SUFFIXES and "__pycache__" not in p.parts]
    script = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if script and script.suffix == ".py" and script.is_file() and PACKAGE_DIR not in script.resolve().parents:
        files.append((script, f"script/{script.name}"))
    return files


def source_snapshot(run_dir: Path) -> Path:
    """Zip the source into <run_dir>/code.zip once per run (every tracker uploads the same file)."""
    path = Path(run_dir) / SNAPSHOT_NAME
    if not path.is_file():
        tmp = path.with_suffix(".tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            for file, name in source_files():
                zf.write(file, name)
        tmp.replace(path)
    return path
