"""The commands that make things: ``synth`` (demo data), ``train``, ``import-weights``, ``certs``.

Each takes the parsed arguments of ``cli.build_parser`` and returns an exit code;
heavy imports happen inside, so that bad arguments fail before any work.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

from patchsvdd.cli.options import DATA, Command, at_least, opt


def load_shard(args: argparse.Namespace, category: str | None = None):
    """The shard of ``category`` (default --category) that --rank-worldsize names, decoded."""
    from patchsvdd.data.mvtec import index_category, load_category, parse_rank_worldsize

    rank, world = parse_rank_worldsize(args.rank_worldsize)
    index = index_category(args.data_root, category or args.category).shard(rank, world)
    return load_category(index, progress=not args.no_progress)


def cmd_synth(args: argparse.Namespace) -> int:
    from patchsvdd.data.synth import generate_category

    path = generate_category(
        args.out, args.category, args.seed, args.n_train, args.n_test_good, args.n_test_per_defect, args.image_size
    )
    print(f"wrote {path}")
    return 0


def train_settings(args: argparse.Namespace):
    """The recipe named by ``--recipe`` (default: the model's) with every setting given on the command line put in."""
    from dataclasses import replace

    from patchsvdd.settings import DEFAULT_RECIPE, RECIPES

    chosen = {
        name: getattr(args, name)
        for name in ("lr", "batch_size", "repeat", "warmup_steps", "schedule", "precision")
        if getattr(args, name) is not None
    }
    return replace(RECIPES[args.recipe or DEFAULT_RECIPE[args.model]], **chosen)


def model_options(args: argparse.Namespace):
    """The model's own options: its defaults, what ``--recipe`` sets of them, and those given on the command line
    (SettingsError for a flag of another model's options)."""
    from patchsvdd.models.registry import model_names
    from patchsvdd.models.registry import model_options as options_of
    from patchsvdd.settings import DEFAULT_RECIPE, SettingsError, recipe_options

    recipe = args.recipe or DEFAULT_RECIPE[args.model]
    own = {f.name for f in fields(options_of(args.model))}
    given = {name: getattr(args, name) for name in option_fields(model_names()) if getattr(args, name) is not None}
    foreign = sorted(set(given) - own)
    if foreign:
        flags = ", ".join("--" + name.replace("_", "-") for name in foreign)
        raise SettingsError(f"{flags}: not an option of {args.model} (its options: {', '.join(sorted(own)) or 'none'})")
    return options_of(args.model, {**recipe_options(recipe, args.model), **given})


def option_fields(models: tuple[str, ...]) -> dict:
    """Every registered model's own option fields by name (the first model's where two share a name)."""
    from patchsvdd.models.registry import options_class

    found: dict = {}
    for model in models:
        for option in fields(options_class(model)):
            found.setdefault(option.name, (model, option))
    return found


def option_flags(models: tuple[str, ...]) -> tuple:
    """A flag per model option (``--emb-dim`` for ``emb_dim``), help and choices from its field's metadata."""
    types = {"int": int, "float": float, "str": str}
    flags = []
    for name, (model, option) in option_fields(models).items():
        extra = {"choices": option.metadata["choices"]} if "choices" in option.metadata else {}
        help_text = f"{model}: {option.metadata.get('help', name)} (None: {option.default!r}, or the recipe's)"
        flags.append(opt("--" + name.replace("_", "-"), type=types[str(option.type)], help=help_text, **extra))
    return tuple(flags)


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from patchsvdd.data.images import is_grayscale
    from patchsvdd.device import resolve_device
    from patchsvdd.models.registry import family
    from patchsvdd.settings import DEFAULT_RECIPE
    from patchsvdd.training.checkpoint import save_checkpoint
    from patchsvdd.training.loop import make_optimizer, train_epoch

    settings = train_settings(args)
    options = model_options(args)  # bad options stop here, before any data is read
    recipe = args.recipe or DEFAULT_RECIPE[args.model]
    device = resolve_device(args.device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    data = load_shard(args)
    torch.manual_seed(args.seed)
    channels = 1 if is_grayscale(data.train_images) else 3
    model_family = family(args.model)
    model = model_family.build(options, channels=channels).to(device)
    optimizer = make_optimizer(model, settings.lr)
    inputs = model_family.inputs(model, data.train_images, data.mean)
    steps_per_epoch = settings.steps_per_epoch(len(inputs), args.max_steps)
    schedule = settings.lr_schedule(args.epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(args.seed)
    print(
        f"training {args.model} on {len(data.train_images)} images of {args.category} on {device}: {args.epochs} x "
        f"{steps_per_epoch} steps, recipe {recipe} ({settings}; {options})"
    )
    history = []
    start = time.perf_counter()
    for epoch in range(args.epochs):
        losses = train_epoch(
            model,
            inputs,
            optimizer,
            settings,
            options=options,
            max_steps=args.max_steps,
            generator=generator,
            schedule=schedule,
            start_step=epoch * steps_per_epoch,
            progress=not args.no_progress,
        )
        history.append(losses)
        print(f"epoch {epoch + 1}/{args.epochs}: {model_family.epoch_line(losses)} ({int(losses['steps'])} steps)")
    save_checkpoint(
        model,
        args.out,
        category=args.category,
        epochs=args.epochs,
        recipe=recipe,
        seed=args.seed,
        settings=asdict(settings),
        model_options=asdict(options),
        history=history,
        train_seconds=time.perf_counter() - start,
    )
    print(f"saved {args.out}")
    return 0


def cmd_import_weights(args: argparse.Namespace) -> int:
    from patchsvdd.models.patchsvdd.released import import_released
    from patchsvdd.training.checkpoint import save_checkpoint

    model, meta = import_released(args.category, args.source)
    if not meta["pinned"]:
        print(
            f"warning: {meta['file']} is not the released file of {args.category} (SHA-256 {meta['sha256']})",
            file=sys.stderr,
        )
    save_checkpoint(model, args.out, imported=meta, category=args.category)
    print(
        f"imported {meta['file']} (SHA-256 {meta['sha256'][:16]}...) -> {args.out}; "
        "position classifiers freshly initialised"
    )
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    from patchsvdd.system.certs import create_federation_certs

    out = create_federation_certs(
        args.out, args.director_host or ["localhost"], args.envoy, args.client or ["frontend"], args.days
    )
    for path in sorted(out.glob("*.crt")):
        print(f"wrote {path} and {path.with_suffix('.key')}")
    print(f"keep {out / 'root_ca.key'} off the nodes; give every node {out / 'root_ca.crt'} and its own .crt/.key")
    return 0


def commands() -> list[Command]:
    """The commands that make things: demo data, a trained model, an imported encoder, certificates."""
    from patchsvdd.data.synth import CATEGORIES
    from patchsvdd.models.registry import model_names
    from patchsvdd.settings import DEMO_DATA, PRECISIONS, RECIPES, SCHEDULES

    synth = Command(
        "synth",
        "write a procedural demo category in the MVTec AD layout",
        (
            opt("--out", required=True, type=Path, help="data root to write <category>/ into"),
            opt("--category", default="fabric", choices=sorted(CATEGORIES)),
            # defaults: the demo's data (settings.DEMO_DATA), so that `synth --category washer` writes what
            # `make demo` uses
            opt("--seed", type=int, default=DEMO_DATA["seed"], help="random seed of the generated images"),
            opt("--n-train", type=at_least(1), default=DEMO_DATA["n_train"], help="good training images"),
            opt("--n-test-good", type=at_least(1), default=DEMO_DATA["n_test_good"], help="good test images"),
            opt(
                "--n-test-per-defect",
                type=at_least(1),
                default=DEMO_DATA["n_test_per_defect"],
                help="test images of each defect type",
            ),
            opt(
                "--image-size",
                type=at_least(256),
                default=DEMO_DATA["image_size"],
                help="side in pixels (>= 256; the reader resizes to 256)",
            ),
        ),
        cmd_synth,
    )
    train = Command(
        "train",
        "train Patch SVDD or the autoencoder baseline on one category locally (centralised)",
        (
            *DATA,
            opt(
                "--model",
                choices=model_names(),
                default="patchsvdd",
                help="patchsvdd, or autoencoder: the convolutional autoencoder baseline (MSE + SSIM loss)",
            ),
            opt(
                "--epochs", type=at_least(0), required=True, help="passes over the data (0: save the initialised model)"
            ),
            opt("--out", required=True, type=Path, help="checkpoint file to write"),
            opt(
                "--recipe",
                choices=sorted(RECIPES),
                help="defaults of the settings below: cpu (He init, lr 1e-3, warm-up, cosine, bf16 where fast; "
                "measured to learn on a CPU), paper (PyTorch init, constant lr 1e-4, fp32), autoencoder "
                "(lr 1e-3, batch 16, one pass per epoch) (None: cpu for patchsvdd, autoencoder for the autoencoder)",
            ),
            opt("--repeat", type=at_least(1), help="times each image is used per epoch (None: the recipe's)"),
            opt("--max-steps", type=at_least(1), default=None, help="cut each epoch to at most this many steps"),
            opt("--batch-size", type=at_least(1), help="pairs per loss (None: the recipe's)"),
            opt("--lr", type=float, help="peak learning rate (None: the recipe's)"),
            opt("--warmup-steps", type=at_least(0), help="linear learning-rate warm-up (None: the recipe's)"),
            opt("--schedule", choices=SCHEDULES, help="after the warm-up: cosine decay to lr/10, or constant"),
            opt("--precision", choices=PRECISIONS, help="auto: bf16 autocast where the GPU/CPU has it, else fp32"),
            *option_flags(model_names()),
            opt("--seed", type=int, default=0, help="random seed of the initialisation and the sampling"),
        ),
        cmd_train,
    )
    released = Command(
        "import-weights",
        "import the authors' released encoder of a category as a checkpoint",
        (
            opt("--category", required=True, help="an MVTec AD category, e.g. bottle"),
            opt(
                "--source",
                help="the released enchier.pkl: a file or URL (default: downloaded once from the "
                "original repository at a pinned commit, SHA-256 checked, cached)",
            ),
            opt("--out", required=True, type=Path, help="checkpoint file to write"),
        ),
        cmd_import_weights,
    )
    certs = Command(
        "certs",
        "create a root authority and mutual-TLS certificates for every node (offline)",
        (
            opt("--out", required=True, type=Path, help="folder for root_ca.* and one .crt/.key per node"),
            opt(
                "--director-host",
                action="append",
                help="name(s) the others use to reach the director (default localhost)",
            ),
            opt("--envoy", action="append", required=True, help="envoy name (its certificate's common name); repeat"),
            opt("--client", action="append", help="notebook client id (default frontend); repeat"),
            opt("--days", type=at_least(1), default=365, help="validity of the certificates"),
        ),
        cmd_certs,
    )
    return [synth, train, released, certs]
