"""train.py under FSDP in CPU processes (gloo), for tests:
    python -m accelerate.commands.launch --config_file configs/accelerate/fsdp.yaml ... \
        tests/fsdp_on_cpu.py CONFIG [key=value ...] [--resume]      (with ACCELERATE_USE_CPU=1)

Accelerate selects FSDP only on accelerators: on CPUs (ACCELERATE_USE_CPU=1) its state says
MULTI_CPU and it wraps the model in DDP whatever the launch config says. PyTorch's FSDP itself
runs on CPUs with gloo, so this script switches Accelerate's state to FSDP, with the plugin the
launch config made, as soon as the state exists, and then runs train.py: mtd's FSDP path
(wrapping once, freezing per stage, sharded checkpoints, full stage-end weights) runs as on GPUs.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed.fsdp as fsdp
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

import train

_init = AcceleratorState.__init__
_FULL_STATE_DICT_CONFIG = fsdp.FullStateDictConfig


def _init_as_fsdp(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.fsdp_plugin = fsdp_plugin
        # Both states: every later AcceleratorState() copies PartialState's over its own. FSDP's
        # CPU device has no index (Accelerate's is cpu:0, which FSDP refuses).
        for shared in (self._shared_state, PartialState._shared_state):
            shared["distributed_type"] = DistributedType.FSDP
            shared["device"] = torch.device("cpu")


def _full_state_dict_config(offload_to_cpu: bool = False, rank0_only: bool = False):
    """Accelerate gathers full weights with offload_to_cpu=True; with the parameters already on
    the CPU, FSDP then frees the storage of the tensors it returns (a segfault, or "storage of
    size 0"). Moving to the CPU is moot there: gather without it."""
    return _FULL_STATE_DICT_CONFIG(offload_to_cpu=False, rank0_only=rank0_only)


if __name__ == "__main__":
    AcceleratorState.__init__ = _init_as_fsdp
    fsdp.FullStateDictConfig = _full_state_dict_config
    sys.exit(train.main(sys.argv[1:]))
