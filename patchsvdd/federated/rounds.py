"""The round tag a model carries through the federation: how many rounds of training made it.

The notebook sends a copy of its model with one extra buffer, ``ROUND_TAG`` (0.0); each envoy's
``train_task`` in round r sets it to r + 1 in the model it trains, and FedAvg averages equal values, so
the aggregate of round r carries r + 1 and the model validated in round r carries r. A model fetched
from the director thus says which model it is, which OpenFL 1.7.1 does not (``SaveWhenImproved`` checks
it). The tag never reaches a checkpoint: ``untagged`` gives the plain model.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

ROUND_TAG = "federated_round"


def tagged(model: nn.Module) -> nn.Module:
    """A copy of ``model`` carrying the round tag 0 (the model sent is round 0's)."""
    model = untagged(model)
    model.register_buffer(ROUND_TAG, torch.zeros(1))  # (1,): OpenFL's tensor codecs expect a dimension
    return model


def set_round(model: nn.Module, trained_rounds: int) -> None:
    """Tag ``model`` (in place) as trained for ``trained_rounds`` rounds; a model without a tag is left alone."""
    tag = getattr(model, ROUND_TAG, None)
    if isinstance(tag, torch.Tensor):
        tag.fill_(float(trained_rounds))


def round_of(model: nn.Module) -> int | None:
    """How many rounds of training made ``model`` (nearest integer of its tag: FedAvg's weighted mean of
    equal values can be off in the last bit); None for a model without a tag."""
    tag = getattr(model, ROUND_TAG, None)
    return int(round(float(tag))) if isinstance(tag, torch.Tensor) else None


def untagged(model: nn.Module) -> nn.Module:
    """A copy of ``model`` without the round tag."""
    model = copy.deepcopy(model)
    if ROUND_TAG in model._buffers:  # nn.Module keeps buffers there; delattr removes one
        delattr(model, ROUND_TAG)
    return model
