"""One definition per option: a config dataclass field carries its command-line name, type, default,
help and validation; the CLIs generate their click options from the fields (`click_options`) and a
Python caller's values pass the same validation (`validate`).

The options every command shares (`--data` with `--train-split`, `--run-dir`, `--device`, `--workers`, `--precision`,
`--seed`) are defined here once, so they mean the same in `agmae-discover`, `agmae-train` and `agmae-eval`.
"""
import dataclasses
from pathlib import Path

import click

from agmae.hardware import PRECISIONS, default_workers
from agmae.errors import UserError


POSITIVE_INT = click.IntRange(min=1)
POSITIVE = click.FloatRange(min=0, min_open=True)
SHARE = click.FloatRange(0, 1)


def option(default, help: str, type=None, flags: tuple = (), show_default: bool = True, fill=None,
           **click_kwargs):
    """A dataclass field that is also a command-line option. type: a click type (its conversion is the
    option's validation, for the CLI and for `validate` alike); flags: the option's declarations when they
    are not `--field-name` (e.g. ("--fused-attn/--no-fused-attn",) or ("--out", "--run-dir")); fill: for a
    default that depends on other options, `fill(config)` gives the value `validate` puts in place of None."""
    return dataclasses.field(default=default, metadata=dict(
        help=help, type=type, flags=tuple(flags), show_default=show_default and default is not None,
        fill=fill, click=click_kwargs))


def click_option(name: str, definition: dataclasses.Field, help_prefix: str = "", unset_default: bool = False):
    """The click option of one `option` definition, for parameter `name`. help_prefix: put before the help (e.g.
    which methods take it); unset_default: the option defaults to None, so a caller can tell the options given on
    the command line from those left to the definition's default (which the help then still shows)."""
    meta = definition.metadata
    declarations = [*(meta["flags"] or ["--" + name.replace("_", "-")]), name]
    help = help_prefix + meta["help"]
    if unset_default and meta["show_default"]:
        help += f" [default: {definition.default}]"
    kwargs = dict(default=None if unset_default else definition.default, help=help,
                  show_default=meta["show_default"] and not unset_default, **meta["click"])
    if isinstance(definition.default, bool) and not meta["flags"]:
        kwargs.update(is_flag=True, show_default=False)
    elif meta["type"] is not None:
        kwargs["type"] = meta["type"]
    return click.option(*declarations, **kwargs)


def compose(*decorators):
    """One decorator applying click decorators in the order listed (the first is the first in --help)."""
    def apply(command):
        for decorator in reversed(decorators):
            command = decorator(command)
        return command
    return apply


def click_options(config_cls, exclude=()):
    """A decorator adding one click option per `option` field of `config_cls`, in field order."""
    return compose(*(click_option(f.name, f) for f in dataclasses.fields(config_cls)
                     if "help" in f.metadata and f.name not in exclude))


def validate(config) -> None:
    """Pass every option field's value through its click type; raise ValueError naming the option."""
    for f in dataclasses.fields(config):
        kind = f.metadata.get("type")
        value = getattr(config, f.name)
        if value is None and f.metadata.get("fill"):
            value = f.metadata["fill"](config)
            setattr(config, f.name, value)
        if kind is None or value is None:
            continue
        many = f.metadata["click"].get("multiple", False)
        try:
            converted = [kind.convert(v, None, None) for v in value] if many else kind.convert(value, None, None)
        except click.BadParameter as err:
            raise UserError(f"--{f.name.replace('_', '-')} {value!r}: {err.message}") from None
        plain = tuple(_plain(v) for v in converted) if many else _plain(converted)
        setattr(config, f.name, plain)


def _plain(value):
    """Config fields hold plain values: a click.Path's Path becomes a str."""
    return str(value) if isinstance(value, Path) else value


class Device(click.ParamType):
    """auto, cpu, cuda or cuda:N, refused at the door when this machine has no such device."""

    name = "device"

    def convert(self, value, param, ctx):
        import torch

        text = str(value)
        if text in ("auto", "cpu"):
            return text
        try:
            device = torch.device(text)
        except RuntimeError:
            self.fail(f"{text!r} is not a device; use auto, cpu, cuda or cuda:N", param, ctx)
        if device.type != "cuda":
            self.fail(f"{text!r}: agmae runs on auto, cpu, cuda or cuda:N", param, ctx)
        if not torch.cuda.is_available():
            self.fail(f"{text!r}: this machine has no CUDA device; use --device cpu (or auto)", param, ctx)
        if device.index is not None and device.index >= torch.cuda.device_count():
            self.fail(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA devices", param, ctx)
        return text


def data_option():
    return option(None, "Dataset root holding one folder per split, ROOT/<split>/<class>/<image> (the same "
                        "in every command; ImageNet: the folder with train/ and val/). [default: the built-in "
                        "demo dataset]", type=click.Path(exists=True, file_okay=False, path_type=Path),
                  show_default=False)


def train_split_option():
    return option("train", "Split folder of --data that is discovered, trained on, and used as the k-NN / "
                           "retrieval bank and the linear probe's training set.", type=click.STRING)


def run_dir_option(help: str, flags=("--run-dir",)):
    return option(None, help, type=click.Path(file_okay=False), flags=flags, show_default=False)


def device_option():
    return option("auto", "auto (CUDA when present), cpu, cuda or cuda:N.", type=Device())


def workers_option(limit: int, help: str):
    """--workers, whose default follows --device (agmae.hardware.default_workers)."""
    return option(None, f"{help} [default: the CPUs this process may use, shared among torchrun's local ranks, "
                        f"less one; on a CPU at most {limit}, as the compute threads need the cores]",
                  type=click.IntRange(min=0), fill=lambda config: default_workers(config.device, limit))


def precision_option(help: str, choices=PRECISIONS, default="auto"):
    return option(default, f"{help} auto: bf16 on CUDA (fp16 with loss scaling when training on a GPU "
                          "without bf16), fp32 on a CPU; native: as auto, but bf16 also on a CPU that computes "
                          "it natively (AVX512-BF16/AMX), where it halves the time.",
                  type=click.Choice(choices))


def verify_images_option(skipped: str):
    """--verify-images: `skipped` says what happens to an image that does not decode."""
    return option(True, "Check once that every image decodes (in parallel, cached per file under AGMAE_HOME/index) "
                        f"and {skipped}.", flags=("--verify-images/--no-verify-images",))


def max_failures_option(images: str, fewer: str = ""):
    """--max-failures: the share of `images` that may be unreadable before the command fails."""
    return option(0.001, f"Fail when more than this fraction of {images} cannot be read{fewer}.", type=SHARE)


def seed_option(help: str):
    return option(0, help, type=click.IntRange(min=0))


def dataset_options(command):
    """`--data ROOT` and `--train-split`, for a command that reads one split of a dataset."""
    return compose(click_option("data", data_option()), click_option("train_split", train_split_option()))(command)
