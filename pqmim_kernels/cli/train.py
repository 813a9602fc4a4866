"""``pqmim train``: two-stage training of a PQ-MIM model (see :mod:`pqmim_kernels.models.train`).

Runs as is on one CPU or GPU, and under ``torchrun --nproc_per_node N -m pqmim_kernels.cli.main
train ...`` with DistributedDataParallel.

Every field of :class:`~pqmim_kernels.models.train.TrainConfig` and of
:class:`~pqmim_kernels.models.config.PQMIMConfig` is a flag (``--kebab-case`` of the field name;
a few model fields keep shorter historical names, e.g. ``--subspaces`` for ``num_subspaces``),
with the dataclass default. The defaults are read from the two dataclass definitions' source
(``ast``, no import), so ``pqmim train --help`` and argument errors need no torch import; a field
added to either dataclass becomes a flag automatically.
"""

from __future__ import annotations

import argparse
import ast
import os
from pathlib import Path

_MODELS = Path(__file__).resolve().parent.parent / "models"

# Help texts of the main flags (other fields take the comment next to their definition).
_TRAIN_HELP = {
    "data": "folder of training images (PNG/JPEG, searched recursively)",
    "out": "output folder (checkpoint.pt, log.jsonl, model.pt)",
    "crop": "square crop size (multiple of 16)",
    "batch_size": "crops per step",
    "stage2_batch_size": "token windows per stage-2 step (0 = same as --batch-size)",
    "stage1_steps": "stage-1 (PQ-VAE) step budget",
    "stage1_minutes": "stage-1 time budget (0 = none); the first budget spent ends the stage",
    "stage2_steps": "stage-2 (MIM entropy model) step budget",
    "stage2_minutes": "stage-2 time budget (0 = none)",
    "lr1": "stage-1 peak learning rate (cosine decay)",
    "lr2": "stage-2 peak learning rate (cosine decay)",
    "warmup": "linear learning-rate warm-up steps (each stage)",
    "seed": "random seed",
    "log_every": "log a line (and to OUT/log.jsonl) every N steps",
    "ckpt_every": "write OUT/checkpoint.pt every N steps (and on Ctrl-C)",
    "device": "auto | cpu | cuda | cuda:N",
    "max_images": "use the first N images of --data (0 = all)",
    "progress": "tqdm progress bars",
}
# PQMIMConfig fields whose flag is not the field name: field -> (flag, help)
_MODEL_FLAGS = {
    "channels": ("--channels", "PQ-VAE conv widths at strides 2, 4, 8, 16 (4 ints)"),
    "latent_dim": ("--latent-dim", "latent dimension D"),
    "num_subspaces": ("--subspaces", "product-quantizer sub-spaces M (D / M dims each)"),
    "codebook_size": ("--codebook-size", "codewords K per sub-space"),
    "res_blocks": ("--res-blocks", "residual blocks at stride 16 on each side"),
    "mim_width": ("--mim-width", "entropy-model transformer width"),
    "mim_depth": ("--mim-depth", "entropy-model transformer depth"),
    "mim_heads": ("--mim-heads", "entropy-model attention heads"),
    "stages": ("--stages", "coding stages S"),
    "decoder_extra_blocks": (
        "--decoder-extra-blocks",
        "residual blocks in the decoder only, at strides 16, 8, 4",
    ),
}
_EPILOG = """\
example (every option at its default):
  pqmim train --data ../shared/data/train --out runs/train

Run the same command again to resume from OUT/checkpoint.pt (the stored model shape wins);
Ctrl-C writes the checkpoint before it stops. Under torchrun every rank runs this command.
"""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after every option's help; the epilog's example kept as written."""


def int_list(count: int, what: str, minimum: int):
    """An argparse ``type``: ``count`` comma-separated ints >= ``minimum`` as a tuple."""

    def parse(text: str) -> tuple[int, ...]:
        try:
            vals = tuple(int(v) for v in text.split(","))
        except ValueError:
            vals = ()
        if len(vals) != count or min(vals) < minimum:
            raise argparse.ArgumentTypeError(
                f"{what} must be {count} comma-separated ints >= {minimum}, got {text!r}"
            )
        return vals

    return parse


_channels = int_list(4, "channels", 1)
_extra_blocks = int_list(3, "decoder extra blocks (strides 16, 8, 4)", 0)


def dataclass_fields(path: Path, class_name: str) -> list[tuple[str, str, object, str]]:
    """``(name, annotation, default, comment)`` of each field of the dataclass ``class_name``
    defined in the Python file ``path``, read from its source without importing it.

    ``annotation`` is the annotation's source text, ``default`` the literal default value and
    ``comment`` the ``# ...`` text on the field's line ("" if none). Raises ``ValueError`` when
    the class is missing or a default is not a literal.
    """
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            break
    else:
        raise ValueError(f"{path}: no class {class_name}")
    out = []
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        if stmt.value is None:
            raise ValueError(f"{path}: {class_name}.{stmt.target.id} has no default")
        default = ast.literal_eval(stmt.value)  # ValueError for a non-literal default
        rest = lines[stmt.end_lineno - 1][stmt.end_col_offset :].strip()  # after the default
        comment = rest[1:].strip() if rest.startswith("#") else ""
        out.append((stmt.target.id, ast.unparse(stmt.annotation), default, comment))
    return out


def _fields():
    """Fields of TrainConfig and PQMIMConfig, from source (or, failing that, by import)."""
    try:
        return (
            dataclass_fields(_MODELS / "train.py", "TrainConfig"),
            dataclass_fields(_MODELS / "config.py", "PQMIMConfig"),
        )
    except (OSError, ValueError, SyntaxError):  # e.g. a non-literal default: ask the classes
        import dataclasses

        from pqmim_kernels.models.config import PQMIMConfig
        from pqmim_kernels.models.train import TrainConfig

        def listed(cls):
            return [
                (f.name, str(f.type), getattr(cls(), f.name), "") for f in dataclasses.fields(cls)
            ]

        return listed(TrainConfig), listed(PQMIMConfig)


def _add_field(group, flag: str, dest: str, annotation: str, default, help_text: str) -> bool:
    """Add one dataclass field as a flag; False when its type has no command-line form."""
    kind = annotation.replace(" ", "")
    metavar = dest.split("_", 1)[1].upper()
    if kind == "bool":
        group.add_argument(
            flag, dest=dest, action=argparse.BooleanOptionalAction, default=default, help=help_text
        )
    elif kind in ("int", "float", "str"):
        group.add_argument(
            flag, dest=dest, type={"int": int, "float": float, "str": str}[kind], default=default,
            metavar=metavar, help=help_text,
        )  # fmt: skip
    else:
        return False
    return True


def register(subparsers) -> None:
    train_fields, model_fields = _fields()
    p = subparsers.add_parser(
        "train",
        help="train a PQ-MIM model (stage 1 PQ-VAE, stage 2 MIM entropy model)",
        description="Train a PQ-MIM model on random crops of a folder of images. Writes "
        "OUT/model.pt (usable with --model), OUT/log.jsonl and OUT/checkpoint.pt.",
        epilog=_EPILOG,
        formatter_class=_HelpFormatter,
    )
    taken, train_dests, model_dests = set(), [], []
    for name, annotation, default, comment in train_fields:
        flag = "--" + name.replace("_", "-")
        text = _TRAIN_HELP.get(name) or comment or f"TrainConfig.{name}"
        if _add_field(p, flag, f"train_{name}", annotation, default, text):
            taken.add(flag)
            train_dests.append(name)
    g = p.add_argument_group("model shape (ignored when resuming)")
    for name, annotation, default, comment in model_fields:
        flag, text = _MODEL_FLAGS.get(name, ("--" + name.replace("_", "-"), ""))
        if flag in taken:  # a model field named like a training option: prefix it
            flag = "--model-" + flag[2:]
        text = text or comment or f"PQMIMConfig.{name}"
        if name in ("channels", "decoder_extra_blocks"):
            g.add_argument(
                flag, dest=f"model_{name}", default=",".join(map(str, default)), help=text,
                type=_channels if name == "channels" else _extra_blocks,
                metavar="C1,C2,C3,C4" if name == "channels" else "N16,N8,N4",
            )  # fmt: skip
        elif not _add_field(g, flag, f"model_{name}", annotation, default, text):
            continue
        model_dests.append(name)
    p.set_defaults(func=run, train_fields=train_dests, model_fields=model_dests)


def run(args) -> int:
    from pqmim_kernels.models.config import PQMIMConfig
    from pqmim_kernels.models.train import TrainConfig, train

    cfg = TrainConfig(**{name: getattr(args, f"train_{name}") for name in args.train_fields})
    model_config = PQMIMConfig(
        **{name: getattr(args, f"model_{name}") for name in args.model_fields}
    )
    model = train(cfg, model_config)
    if os.environ.get("RANK", "0") == "0":
        print(f"pqmim train: wrote {cfg.out}/model.pt (model id {model.model_id().hex()})")
    return 0
