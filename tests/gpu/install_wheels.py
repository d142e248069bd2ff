"""Install, offline, the carried wheels (tests/gpu/fetch_wheels.sh) that this Python lacks.

    python3 tests/gpu/install_wheels.py WHEEL_DIR TARGET     # then put TARGET first on PYTHONPATH

A wheel is installed when its distribution is absent, or when a wheel being installed requires a
version the installed one does not satisfy (pydantic 2.14 needs a newer typing-extensions than a
torch image may hold). Present and good enough: left alone, so the image's own builds stay in use.
Prints what it installed and any requirement that neither the image nor the wheels satisfy.
"""
from __future__ import annotations

import subprocess
import sys
import zipfile
from email.parser import Parser
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version


def _requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(z.read(name).decode())
    reqs = [Requirement(r) for r in meta.get_all("Requires-Dist") or []]
    return [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]


def _installed() -> dict[str, Version]:
    found: dict[str, Version] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(canonicalize_name(name), Version(dist.version))
    return found


def choose(wheels: dict[str, tuple[Version, list[Requirement]]],
           installed: dict[str, Version]) -> tuple[set[str], set[str]]:
    """(names of the carried wheels to install, requirements left unmet), from each carried wheel's
    version and requirements and the installed versions, all keyed by canonical name."""
    chosen = {name for name in wheels if name not in installed}
    unmet: set[str] = set()
    changed = True
    while changed:  # a chosen wheel's requirements may pull in another carried wheel
        changed = False
        unmet.clear()
        for name in sorted(chosen):
            for req in wheels[name][1]:
                dep = canonicalize_name(req.name)
                have = wheels[dep][0] if dep in chosen else installed.get(dep)
                if have is not None and req.specifier.contains(have, prereleases=True):
                    continue
                if dep in wheels and dep not in chosen and req.specifier.contains(wheels[dep][0], prereleases=True):
                    chosen.add(dep)
                    changed = True
                else:
                    unmet.add(f"{req} (for {name}; have {have})")
    return chosen, unmet


def main(wheel_dir: str, target: str) -> int:
    paths = {}
    for path in sorted(Path(wheel_dir).glob("*.whl")):
        name, version, _, _ = parse_wheel_filename(path.name)
        paths[canonicalize_name(name)] = (version, path)
    if not paths:
        print(f"install_wheels: no wheels in {wheel_dir} (run tests/gpu/fetch_wheels.sh, carry tests/gpu/wheels)")
        return 0
    installed = _installed()
    chosen, unmet = choose({name: (v, _requirements(path)) for name, (v, path) in paths.items()}, installed)
    for name in sorted(paths):
        state = "install" if name in chosen else f"keep installed {installed[name]}"
        print(f"install_wheels: {name} {paths[name][0]}: {state}")
    for line in sorted(unmet):
        print(f"install_wheels: unmet requirement {line}")
    if chosen:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--disable-pip-version-check", "--upgrade", "--target", target,
                        *(str(paths[name][1]) for name in sorted(chosen))], check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:]))
