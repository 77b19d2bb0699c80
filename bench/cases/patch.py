"""Patch cases: HuggingFace models built from their configs (random weights, no download), as
they come (the eager column: transformers' default attention, "sdpa") and after
``fastdl.patch`` (attention through fastdl, fastdl norms), from the same weights.

GPT-2 small's config (2 of its 12 layers) times a training forward+backward of the language-
model loss on 8 x 256 tokens; BERT-base's (2 of 12 layers) an inference forward on 8 x 256
tokens. A model call is not a function torch.compile should be timed on beside eager here, so
there is no compile column. The error column compares the output (GPT-2: the loss) with the
unpatched model's in float64.
"""

import copy
from dataclasses import dataclass
from typing import Any

import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

import fastdl
from bench.cases import Case, Inputs, Target

BATCH, TOKENS, LAYERS = 8, 256, 2


def _gpt2() -> GPT2LMHeadModel:
    # Dropout off: the training step is then deterministic and its loss comparable in float64.
    cfg = GPT2Config(n_layer=LAYERS, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).train()


def _bert() -> BertModel:
    return BertModel(BertConfig(num_hidden_layers=LAYERS), add_pooling_layer=False).eval()


class Pair:
    """A model as built and its patched copy."""

    def __init__(self, build, device: torch.device):
        torch.manual_seed(0)
        model = build().to(device)
        patched = copy.deepcopy(model)
        fastdl.patch(patched)
        self.models = {"unpatched": model, "patched": patched}


def _forward(model, ids: torch.Tensor, train: bool) -> torch.Tensor:
    if not train:
        with torch.no_grad():
            return model(input_ids=ids).last_hidden_state
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach()


@dataclass(frozen=True)
class PatchCase(Case):
    build: Any = None

    def run(self, fn, inputs: Inputs) -> Any:
        return fn(*inputs.args)

    def reference(self, inputs: Inputs) -> Any:
        pair, ids = inputs.args
        model = copy.deepcopy(pair.models["unpatched"]).double()
        with torch.no_grad():
            out = model(input_ids=ids, labels=ids if self.mode != "fwd" else None)
        return out.loss if self.mode != "fwd" else out.last_hidden_state


def _make(case: PatchCase, device: torch.device) -> Inputs:
    pair = Pair(case.build, device)
    vocab = pair.models["unpatched"].config.vocab_size
    ids = torch.randint(0, vocab, (BATCH, TOKENS), generator=torch.Generator().manual_seed(0))
    return Inputs((pair, ids.to(device)), None)


def _case(op: str, mode: str, build) -> PatchCase:
    train = mode != "fwd"
    return PatchCase(
        family="patch",
        op=op,
        mode=mode,
        shape=(BATCH, TOKENS),
        dtype=torch.float32,
        make=_make,
        fastdl=lambda pair, ids: _forward(pair.models["patched"], ids, train),
        eager=lambda pair, ids: _forward(pair.models["unpatched"], ids, train),
        variant=f"{LAYERS}-layer",
        target=Target(eager=1.3),
        compiled=False,
        build=build,
    )


CASES = [_case("gpt2-small", "fwd+bwd", _gpt2), _case("bert-base", "fwd", _bert)]
