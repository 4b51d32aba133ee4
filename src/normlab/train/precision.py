"""Mixed precision for the one training loop: ``precision=fp32|bf16|fp16``.

* ``fp32``: plain float32, nothing changes.
* ``bf16``: forward and loss under ``torch.autocast(dtype=torch.bfloat16)``; parameters, gradients
  and optimizer state stay float32 (bfloat16 has float32's range, so no loss scaling is needed).
* ``fp16``: the same with float16, plus a ``torch.amp.GradScaler``: the loss is multiplied by a
  scale before backward, the gradients are unscaled before the step, and a step whose gradients
  hold an inf or NaN is **skipped** (the scale is halved). A skipped step is skipped for every
  part of the step: the optimizer (SGD-G, Adam-G, SphereSGD: no move on the sphere), and the
  post-step callbacks, which see ``state.step_skipped`` (ENorm does not rescale then).

Telling a skipped step from a taken one reads the scale back from the device (one host
synchronisation per step, fp16 only); fp32 and bf16 steps never synchronise here.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """Autocast and loss scaling for one run on ``device``."""

    def __init__(self, name: str, device: torch.device):
        if name not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
        self.name = name
        self.dtype = PRECISIONS[name]
        self.device_type = torch.device(device).type
        self.scaler = (
            torch.amp.GradScaler(self.device_type) if self.dtype is torch.float16 else None
        )

    def autocast(self):
        """Context for the forward pass and the loss."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Step ``optimizer``; False when fp16 loss scaling skipped the step (inf/NaN grads)."""
        if self.scaler is None:
            optimizer.step()
            return True
        scale = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        return self.scaler.get_scale() >= scale  # the scale only shrinks on a skipped step

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
