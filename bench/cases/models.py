"""Model cases: a training step of each model of fastdl.models beside its plain-torch twin.

Both start from the same weights and train on the same batch with AdamW (fastdl.models.train.step),
so the eager column is the twin's step and the speed-up is the issue's "step time against its
torch twin"; inference-only (INT8) models time one forward against their float32 twin. A step
that owns an optimizer is not a function torch.compile traces whole, so there is no compile
column. The error column compares the first step's loss (inference: the output) with the twin's
computed in float64 from the same weights.
"""

import copy
from dataclasses import dataclass
from typing import Any

import torch

from bench.cases import Case, Inputs, Target
from fastdl.models import ModelSpec, specs
from fastdl.models import train as training

# The models the issue gives a figure for: training step (inference for INT8) vs the twin.
TARGETS = {"gpt": 1.3, "resnet18": 1.3, "lstm-lm": 1.3, "gcn": 1.3, "gpt-int8": 2.0}


class Pair:
    """A model and its twin from the same weights, each with its own optimizer."""

    def __init__(self, spec: ModelSpec, device: torch.device):
        torch.manual_seed(0)
        self.spec = spec
        model = spec.build().to(device)
        twin = spec.twin().to(device)
        twin.load_state_dict(model.state_dict())
        self.models = {"fastdl": model, "torch": twin}
        if spec.train:
            self.opts = {who: training.optimizer(m, spec) for who, m in self.models.items()}
        else:
            for m in self.models.values():
                m.eval()

    def __call__(self, who: str, inputs: tuple, target: Any) -> torch.Tensor:
        model = self.models[who]
        if self.spec.train:
            return training.step(model, self.opts[who], self.spec, inputs, target)
        with torch.no_grad():
            return model(*inputs)


def _float64(a: Any) -> Any:
    return a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a


@dataclass(frozen=True)
class ModelCase(Case):
    spec: ModelSpec | None = None

    def run(self, fn, inputs: Inputs) -> Any:
        return fn(*inputs.args)

    def reference(self, inputs: Inputs) -> Any:
        """The twin in float64, from the weights both models start with: the loss of the first
        step (inference: the output)."""
        pair, batch, target = inputs.args
        twin = copy.deepcopy(pair.models["torch"]).double()
        with torch.no_grad():
            out = twin(*map(_float64, batch))
            return out if not self.spec.train else self.spec.loss(out, _float64(target))


def _make(case: ModelCase, device: torch.device) -> Inputs:
    pair = Pair(case.spec, device)
    batch, target = case.spec.batch(torch.Generator().manual_seed(0), device)
    return Inputs((pair, batch, target), None)


def _case(spec: ModelSpec) -> ModelCase:
    return ModelCase(
        family="models",
        op=spec.name,
        mode="train" if spec.train else "infer",
        shape=(),
        dtype=torch.float32,
        make=_make,
        fastdl=lambda pair, batch, target: pair("fastdl", batch, target),
        eager=lambda pair, batch, target: pair("torch", batch, target),
        target=Target(eager=TARGETS[spec.name]) if spec.name in TARGETS else None,
        compiled=False,
        spec=spec,
    )


CASES = [_case(spec) for spec in specs().values()]
