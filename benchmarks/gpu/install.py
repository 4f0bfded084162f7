"""What the device calls carry, and how the device installs it.

Here (a machine with a registry), `--prepare` downloads the onnxruntime-gpu and grpc wheels, splits
the big one into parts and prints the calls that carry them. There, before anything else is
importable, `install` joins the parts (checked against parts.json), installs the wheels and the
project from this working tree, and `reexec_installed` runs run.py again with PYTHONPATH and
LD_LIBRARY_PATH set."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, Sequence

from benchmarks.gpu.config import CARRY_LIMIT, PART_BYTES, ROOT, SMALL_WHEELS, STAGE_ENV, NoCuda, StepFailed

SCRIPT = Path(__file__).resolve().with_name("run.py")  # what the install step runs again


def part_files(dirs: Sequence[str | Path]) -> dict[str, Path]:
    """part-NN files by name over several folders (a part carried twice counts once)."""
    parts: dict[str, Path] = {}
    for folder in dirs:
        for path in sorted(Path(folder).glob("part-*")):
            parts.setdefault(path.name, path)
    return parts


def _wheel_name(path: Path) -> str:
    """A wheel's proper file name, read from its own dist-info (pip refuses any other name)."""
    with zipfile.ZipFile(path) as wheel:
        info = next(n for n in wheel.namelist() if n.endswith(".dist-info/WHEEL"))
        tags = [line.split(":", 1)[1].strip() for line in wheel.read(info).decode().splitlines()
                if line.startswith("Tag:")]
    dist = info.split("/")[0][: -len(".dist-info")]
    py, abi = tags[0].split("-")[:2]
    platforms = ".".join(dict.fromkeys(t.split("-")[2] for t in tags))
    return f"{dist}-{py}-{abi}-{platforms}.whl"


def reassemble_wheel(dirs: Sequence[str | Path], dest: Path) -> Path:
    """Joins the carried part-NN files into the onnxruntime-gpu wheel, checked against parts.json."""
    parts = part_files(dirs)
    meta = _parts_meta(dirs)
    expected = [p["name"] for p in meta["parts"]] if meta else \
        [f"part-{i:02d}" for i in range(len(parts))]
    missing = [name for name in expected if name not in parts]
    if not parts or missing:
        raise NoCuda(f"onnxruntime-gpu parts missing: {missing or expected} not found in "
                     f"{[str(d) for d in dirs]}; carry every part in the calls before this one "
                     "(benchmarks/gpu/README.md)")
    dest.mkdir(parents=True, exist_ok=True)
    joined = dest / "joined.whl"
    digest = hashlib.sha256()
    with open(joined, "wb") as out:
        for name in expected:
            data = parts[name].read_bytes()
            digest.update(data)
            out.write(data)
    if meta and digest.hexdigest() != meta["sha256"]:
        raise NoCuda(f"the reassembled onnxruntime-gpu wheel does not match parts.json "
                     f"(sha256 {digest.hexdigest()[:12]} vs {meta['sha256'][:12]}): a part is stale")
    wheel = dest / (meta["wheel"] if meta else _wheel_name(joined))
    joined.replace(wheel)
    return wheel


def cuda_library_dirs(paths: Sequence[str] | None = None) -> list[str]:
    """The lib/ folders of the nvidia-* wheels (cuBLAS, cuDNN, cudart, ...) on sys.path."""
    found: list[str] = []
    for entry in paths if paths is not None else sys.path:
        base = Path(entry or ".") / "nvidia"
        if base.is_dir():
            found += [str(lib) for lib in sorted(base.glob("**/lib")) if any(lib.glob("lib*.so*"))]
    return list(dict.fromkeys(found))


def _pip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                           "--no-compile", "--no-cache-dir", *args],
                          capture_output=True, text=True, timeout=300)


def link_project(target: Path) -> None:
    """snapserve/<sub> -> <repo>/<folder>, as pyproject.toml's package-dir maps them: the
    project importable without building it (the fallback when pip cannot build here)."""
    package = target / "snapserve"
    package.mkdir(parents=True, exist_ok=True)
    for name, folder in _package_dirs():
        (package / name).symlink_to(ROOT / folder, target_is_directory=True)


def _package_dirs() -> list[tuple[str, str]]:
    """(subpackage, folder) pairs of pyproject.toml's [tool.setuptools] package-dir."""
    text = (ROOT / "pyproject.toml").read_text()
    table = re.search(r"^package-dir\s*=\s*\{(.*?)\}", text, re.M | re.S)
    if table is None:
        raise StepFailed("pyproject.toml has no [tool.setuptools] package-dir")
    return re.findall(r'"snapserve\.(\w+)"\s*=\s*"([^"]+)"', table.group(1))


def _source_copy(dest: Path) -> Path:
    """What the build reads, copied out of the working tree: setuptools writes build/ and
    *.egg-info next to the sources, and a stale build/ keeps modules that have since moved."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    for _, folder in _package_dirs():
        shutil.copytree(ROOT / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def _parts_meta(dirs: Sequence[str | Path]) -> dict[str, Any] | None:
    path = next((Path(d) / "parts.json" for d in dirs if (Path(d) / "parts.json").is_file()), None)
    return json.loads(path.read_text()) if path else None


def install(args: argparse.Namespace) -> dict[str, Any]:
    """Installs the carried wheels and the project under --site; returns what it did. A rerun
    on a warm machine finds the wheels installed (deps.json) and skips them."""
    site = Path(args.site)
    deps, marker = site / "deps", site / "deps.json"
    installed = json.loads(marker.read_text()) if marker.is_file() else []
    wheels: list[Path] = []
    if args.ort_parts:
        meta = _parts_meta(args.ort_parts)
        kept = site / "wheel" / meta["wheel"] if meta else None
        if kept is not None and kept.is_file() and meta["wheel"] in installed:
            wheels.append(kept)  # installed by an earlier call of this machine
        else:
            wheels.append(reassemble_wheel(args.ort_parts, site / "wheel"))
    if args.wheels:
        wheels += sorted(Path(args.wheels).glob("*.whl"))
    wanted = [w.name for w in wheels]
    info: dict[str, Any] = {"site": str(site), "wheels": wanted, "reinstalled": wanted != installed}
    if wheels and wanted != installed:
        shutil.rmtree(deps, ignore_errors=True)
        done = _pip("--target", str(deps), *map(str, wheels))
        if done.returncode != 0:
            raise NoCuda(f"pip could not install {wanted}:\n{done.stderr[-2000:]}")
        marker.write_text(json.dumps(wanted))
    project = site / "project"
    shutil.rmtree(project, ignore_errors=True)  # the tree may have changed since the last call
    if importable("snapserve.server") and importable("snapserve.trainer"):
        info["project"] = "already importable"
    else:
        built = _pip("--no-build-isolation", "--target", str(project), str(_source_copy(site / "source")))
        if built.returncode == 0:
            info["project"] = "pip install --no-deps of the working tree"
        else:
            shutil.rmtree(project, ignore_errors=True)
            link_project(project)
            why = [line.strip() for line in built.stderr.splitlines() if "rror" in line][:3]
            info["project"] = f"linked to the working tree (pip could not build it: {' / '.join(why)})"
    info["pythonpath"] = [str(project), str(deps)]
    info["ld_library_path"] = cuda_library_dirs()
    return info


def importable(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def reexec_installed(info: dict[str, Any], argv: Sequence[str]) -> None:
    """Runs this script again with the installed paths: LD_LIBRARY_PATH must be set before the
    process starts for the dynamic loader (and the server's) to see it."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*info["pythonpath"], env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        [*info["ld_library_path"], env.get("LD_LIBRARY_PATH", "")]).rstrip(os.pathsep)
    env[STAGE_ENV] = json.dumps(info)
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, str(SCRIPT), *argv], env)


def _constraint(name: str) -> str:
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.split("==")[0].strip().lower() == name:
            return line.split("==")[1].strip()
    raise SystemExit(f"constraints.txt pins no {name}")


def _download(spec: str, dest: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp",
                    "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_27_x86_64",
                    "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
                    "-d", str(dest), spec], check=True)


def tree_bytes() -> int:
    """What a device call sends besides the carried paths: tracked and untracked-not-ignored files."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / name.decode()).stat().st_size for name in listed
               if name and (ROOT / name.decode()).is_file())


def prepare(part_bytes: int = PART_BYTES) -> int:
    """Downloads the wheels for the device's Python 3.12 into .ortgpu/ (ignored by git), splits
    the onnxruntime-gpu wheel into parts and prints the device calls to make, back to back."""
    folder, wheels = ROOT / ".ortgpu", ROOT / ".ortgpu" / "wheels"
    exclude = ROOT / ".git" / "info" / "exclude"
    exclude.parent.mkdir(parents=True, exist_ok=True)
    if "/.ortgpu/" not in (exclude.read_text().splitlines() if exclude.exists() else []):
        with open(exclude, "a") as f:
            f.write("/.ortgpu/\n")
    wheels.mkdir(parents=True, exist_ok=True)
    version = _constraint("onnxruntime-gpu")
    wheel = next(iter(sorted(folder.glob(f"onnxruntime_gpu-{version}-*.whl"))), None)
    if wheel is None:
        _download(f"onnxruntime-gpu=={version}", folder)
        wheel = next(iter(sorted(folder.glob(f"onnxruntime_gpu-{version}-*.whl"))))
    for name in SMALL_WHEELS:
        pinned = _constraint(name)
        stem = name.replace("-", "_")
        for old in wheels.glob(f"{stem}-*.whl"):
            if not old.name.startswith(f"{stem}-{pinned}-"):
                old.unlink()
        if not list(wheels.glob(f"{stem}-{pinned}-*.whl")):
            _download(f"{name}=={pinned}", wheels)
    for old in folder.glob("part-*"):
        old.unlink()
    data, digest, parts = wheel.read_bytes(), hashlib.sha256(), []
    digest.update(data)
    for index, start in enumerate(range(0, len(data), part_bytes)):
        part = folder / f"part-{index:02d}"
        part.write_bytes(data[start:start + part_bytes])
        parts.append({"name": part.name, "bytes": part.stat().st_size})
    (folder / "parts.json").write_text(json.dumps(
        {"wheel": wheel.name, "bytes": len(data), "sha256": digest.hexdigest(), "parts": parts}, indent=1))
    print_calls(wheel, parts, sum(p.stat().st_size for p in wheels.glob("*.whl")), tree_bytes())
    return 0


def print_calls(wheel: Path, parts: list[dict[str, Any]], wheels_bytes: int, tree: int) -> None:
    mib = 2**20
    last = parts[-1]
    with_run = tree + last["bytes"] + wheels_bytes + 4096 <= CARRY_LIMIT - 4 * mib
    separate = parts if not with_run else parts[:-1]
    print(f"onnxruntime-gpu wheel: {wheel.name}, {wheel.stat().st_size / mib:.1f} MiB in {len(parts)} parts")
    print(f"small wheels (.ortgpu/wheels): {wheels_bytes / mib:.1f} MiB; working tree: {tree / mib:.2f} MiB")
    print(f"device calls: {len(separate) + 1} ({len(separate)} carrying a part, then the run"
          f"{' with the last part' if with_run else ''}); make them back to back (warm 30 s)\n")
    for i, part in enumerate(separate, 1):
        print(f"{i}. carry [\".ortgpu/{part['name']}\"]  ({(tree + part['bytes']) / mib:.1f} MiB)\n"
              f"   command: mkdir -p /tmp/ortgpu && cp .ortgpu/{part['name']} /tmp/ortgpu/ && ls -l /tmp/ortgpu")
    carry = ([f".ortgpu/{last['name']}"] if with_run else []) + [".ortgpu/parts.json", ".ortgpu/wheels"]
    print(f"{len(separate) + 1}. carry {json.dumps(carry)}  timeout_s 450\n"
          "   command: PYTHONUNBUFFERED=1 python3 benchmarks/gpu/run.py --device cuda "
          "--ort-parts /tmp/ortgpu .ortgpu --wheels .ortgpu/wheels --work /tmp/snapserve-gpu-work "
          "--out \"$OUT\"")
