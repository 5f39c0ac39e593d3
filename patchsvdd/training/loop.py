"""The one training loop of every model: seeds, the batches of an epoch, the learning-rate schedule,
mixed precision, the progress bar, and ``train_epoch``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from patchsvdd.device import bf16_support
from patchsvdd.models.registry import family_of
from patchsvdd.settings import PRECISIONS, LRSchedule, TrainSettings


def as_generator(seed_or_generator: int | torch.Generator | None) -> torch.Generator:
    """A CPU generator: the one given, one seeded with the int given, or a randomly seeded one."""
    if isinstance(seed_or_generator, torch.Generator):
        return seed_or_generator
    generator = torch.Generator()
    if seed_or_generator is None:
        generator.seed()
    else:
        generator.manual_seed(int(seed_or_generator))
    return generator


def epoch_batches(
    n_images: int, repeat: int, batch_size: int, max_steps: int | None, generator: torch.Generator
) -> list[torch.Tensor]:
    """The image indices of each step of one epoch: every image ``repeat`` times, shuffled, in batches of
    ``batch_size`` (the last may be smaller), cut to ``max_steps`` batches when given."""
    if batch_size < 1 or repeat < 1:
        raise ValueError(f"batch_size={batch_size}, repeat={repeat}: both must be at least 1")
    order = torch.arange(n_images).repeat(repeat)[torch.randperm(n_images * repeat, generator=generator)]
    batches = list(order.split(batch_size))
    return batches if max_steps is None else batches[:max_steps]


def set_learning_rate(optimizer: torch.optim.Optimizer, schedule: LRSchedule | None, step: int) -> None:
    """Put the schedule's learning rate of global ``step`` into every parameter group (None: leave it)."""
    if schedule is not None:
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr_at(step)


def progress_bar(steps: int, desc: str = "train"):
    """A tqdm bar of ``steps`` steps that disappears when done."""
    from tqdm.auto import tqdm

    return tqdm(total=steps, desc=desc, leave=False)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """'fp32' -> None (no autocast); 'bf16' -> bfloat16 autocast of the encoders; 'auto' -> bf16 where the
    device has it natively (``device.bf16_support``: a GPU with bf16, a CPU with AVX-512 BF16 / AMX), else
    fp32. The position classifiers and the losses always run in float32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose {', '.join(PRECISIONS)}")
    if precision == "auto":
        precision = "bf16" if bf16_support(device).native else "fp32"
    return torch.bfloat16 if precision == "bf16" else None


def make_optimizer(model: nn.Module, lr: float = TrainSettings.lr) -> torch.optim.Adam:
    """Adam over every parameter of the model (Patch SVDD: both encoders and both classifiers)."""
    return torch.optim.Adam(model.parameters(), lr=lr)


def train_epoch(
    model: nn.Module,
    inputs: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    recipe: TrainSettings = TrainSettings(),
    *,
    options: Any = None,
    repeat: int | None = None,
    batch_size: int | None = None,
    precision: str | None = None,
    max_steps: int | None = None,
    generator: int | torch.Generator | None = None,
    schedule: LRSchedule | None = None,
    start_step: int = 0,
    progress: bool = False,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    penalty: Callable[[], torch.Tensor] | None = None,
) -> dict[str, float]:
    """One epoch of any registered model on ``inputs`` (its family's ``inputs`` of uint8 images).

    Each of the N inputs ``repeat`` times, shuffled by ``generator`` (seed or generator; None: random), in batches
    of ``batch_size``, cut to ``max_steps``; ``repeat``, ``batch_size`` and ``precision`` ('fp32', 'bf16' or 'auto',
    see ``resolve_precision``) default to ``recipe``'s; ``options`` are the model's own (its family's dataclass,
    e.g. Patch SVDD's lambda; None: its defaults). ``schedule`` sets the learning rate at each global step
    (``start_step`` + step; None keeps the optimizer's). Each step: the family's step (``ModelFamily.epoch_steps``),
    backward, optimizer step, the family's check, then ``on_step(global_step, values)``; ``penalty()`` (a scalar,
    e.g. FedProx's proximal term) is added to every step's loss. A tqdm bar with ``progress``. Returns each value's
    mean over the epoch and 'steps'.
    """
    model_family = family_of(model)
    steps = model_family.epoch_steps(model, inputs, recipe, model_family.options() if options is None else options)
    device = next(model.parameters()).device
    autocast_dtype = resolve_precision(recipe.precision if precision is None else precision, device)
    generator = as_generator(generator)
    batches = epoch_batches(
        steps.n_images,
        recipe.repeat if repeat is None else repeat,
        recipe.batch_size if batch_size is None else batch_size,
        max_steps,
        generator,
    )
    sums: dict[str, float] = {}
    bar = progress_bar(len(batches)) if progress else None
    for number, index in enumerate(batches):
        global_step = start_step + number
        set_learning_rate(optimizer, schedule, global_step)
        loss, values = steps.step(index, generator, autocast_dtype)
        if penalty is not None:
            loss = loss + penalty()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for name, value in values.items():
            sums[name] = sums.get(name, 0.0) + value
        if steps.check is not None:
            steps.check(global_step, values)
        if on_step is not None:
            on_step(global_step, values)
        if bar is not None:
            bar.update()
            bar.set_postfix({name: f"{values[name]:.4f}" for name in steps.shown})
    if bar is not None:
        bar.close()
    result = {name: value / max(len(batches), 1) for name, value in sums.items()}
    result["steps"] = float(len(batches))
    return result
