"""Let torchvision's Python part import where its compiled ops cannot load.

PyPI's torchvision wheel is built against the CUDA torch. Beside a CPU-only torch of the same
version its C++ extension fails to load, and `import torchvision` then dies in
`_meta_registrations.py`, which registers fake kernels for `torchvision::nms` and `qnms`: ops that
do not exist. timm, open_clip and parts of transformers import torchvision, so all of them fail.
Declaring the two operator schemas first (what the extension would have done) lets the import go
through; the detection ops stay unusable, and nothing in mtd needs them.

Harmless where torchvision works: the schemas are declared only when the extension did not load,
which is checked before torchvision is imported for real (a GPU machine registers them itself).
"""

from __future__ import annotations

import importlib.util
import logging

logger = logging.getLogger(__name__)

# Exactly the schemas torchvision/csrc/ops/nms.cpp declares.
_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library = None  # keeps the torch.library.Library alive: dropping it removes the definitions


def _op_exists(name: str) -> bool:
    import torch

    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
    except RuntimeError:
        return False
    return True


def _load_extension() -> bool:
    """Try torchvision's compiled ops the way torchvision itself does; True if they loaded."""
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    from pathlib import Path

    folder = Path(next(iter(spec.submodule_search_locations)))
    for lib in sorted(folder.glob("_C*.so")) + sorted(folder.glob("_C*.pyd")):
        try:
            torch.ops.load_library(str(lib))
            return True
        except (OSError, RuntimeError):
            return False
    return False


def patch_torchvision() -> bool:
    """Declare torchvision's nms/qnms schemas if its extension cannot provide them.

    Returns True when it declared them (the CPU-torch case), False when nothing was needed.
    Must run before the first `import torchvision`; later calls are no-ops.
    """
    global _library
    if _library is not None or importlib.util.find_spec("torchvision") is None:
        return False
    if all(_op_exists(n) for n in _SCHEMAS) or _load_extension():
        return False
    import torch

    _library = torch.library.Library("torchvision", "DEF")
    for name, schema in _SCHEMAS.items():
        if not _op_exists(name):
            _library.define(schema)
    logger.debug("torchvision's compiled ops are unavailable; declared nms/qnms so it imports.")
    return True
