"""Stop a run after its first optimizer steps and keep what the trainer computed there.

Tests of the gradient itself need this: AdamW ignores the gradient's overall scale, so a run's
weights do not show a gradient that is 1/2 or 2x what it should be. The probe wraps the trainer's
micro step and optimizer step (StageRunner) and keeps, per micro-batch, the collated inputs and
targets and a copy of the student as it was (weights, train/eval modes), and per optimizer step
every parameter's `.grad` as backward left it (before clipping and the optimizer).

Also a script for runs under `accelerate launch` (see `launch_two_processes`):
    tests/gradprobe.py CONFIG.yaml OUT.pt   ->  OUT.pt: the first step's gradients (rank 0)
"""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mtd.config import load_config
from mtd.training import pipeline
from mtd.training.trainer import StageRunner

ROOT = Path(__file__).resolve().parents[1]
_MICRO_STEP = StageRunner._micro_step  # the real ones, whatever a probe installed since
_OPTIMIZER_STEP = StageRunner._optimizer_step


class StopRun(Exception):
    """Raised after the probe's last optimizer step: ends the run there."""


@dataclass
class Probe:
    steps: int = 1  # optimizer steps to let through
    grads: list[dict[str, torch.Tensor]] = field(default_factory=list)  # per optimizer step
    batches: list[tuple[dict, dict]] = field(default_factory=list)  # per micro-batch: inputs, targets
    students: list[torch.nn.Module] = field(default_factory=list)  # per micro-batch, before it

    def install(self, setattr=setattr) -> Probe:
        """Wrap the trainer's steps (pass monkeypatch.setattr to undo it after the test)."""
        probe = self

        def micro_step(runner, model, batch, target, step, micro):
            probe.batches.append((batch, target))
            probe.students.append(copy.deepcopy(runner.acc.unwrap_model(model)))
            return _MICRO_STEP(runner, model, batch, target, step, micro)

        def optimizer_step(runner, model, optimizer, scheduler):
            student = runner.acc.unwrap_model(model)
            probe.grads.append({n: p.grad.detach().clone() for n, p in student.named_parameters()
                                if p.grad is not None})
            if len(probe.grads) >= probe.steps:
                raise StopRun
            return _OPTIMIZER_STEP(runner, model, optimizer, scheduler)

        setattr(StageRunner, "_micro_step", micro_step)
        setattr(StageRunner, "_optimizer_step", optimizer_step)
        return self

    def run(self, cfg) -> Probe:
        try:
            pipeline.run(cfg)
        except StopRun:
            pass
        assert len(self.grads) == self.steps, "the run ended before the probe's last step"
        return self


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_processes(script: str | Path, *args: str, use_cpu: bool = True,
                         backend: tuple[str, ...] = ("--multi_gpu",),
                         timeout: int = 540) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS` in 2 CPU processes (gloo). `accelerate launch --cpu --num_processes 2`
    is not it: without mpirun it starts ONE process. Torchrun under Accelerate (--multi_gpu) with
    ACCELERATE_USE_CPU=1 is (use_cpu=False leaves it out, to test that mistake). backend: the
    launch's options that choose it (e.g. --config_file configs/accelerate/fsdp.yaml)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    env.pop("ACCELERATE_USE_CPU", None)
    if use_cpu:
        env["ACCELERATE_USE_CPU"] = "1"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *backend, "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(script), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def main(config_yaml: str, out: str) -> None:
    probe = Probe().install().run(load_config(config_yaml))
    if int(os.environ.get("RANK", "0")) == 0:  # after DDP's all-reduce every rank holds the same
        torch.save(probe.grads[0], out)


if __name__ == "__main__":
    main(*sys.argv[1:])
