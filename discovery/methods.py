"""The discovery methods behind one interface: each is a module with a `build` and an options dataclass,
registered here by name; `build(name, ...)` gives the callable that turns images into maps."""
import dataclasses
from typing import NamedTuple

from agmae.discovery import dino, gradcam, oracle, tokencut
from agmae.errors import UserError


class Method(NamedTuple):
    build: callable  # build(options, backbone=..., weights=..., device=..., random_init=..., seed=..., precision=...)
    options: type  # the dataclass of the method's own options (agmae.options fields)


METHODS = {
    "tokencut": Method(tokencut.build, tokencut.TokenCutOptions),
    "dino": Method(dino.build, dino.DinoOptions),
    "gradcam": Method(gradcam.build, gradcam.GradCAMOptions),
    "oracle": Method(oracle.build, oracle.OracleOptions),
}


def method_options(method) -> list:
    """Names of the options of `method` (its options dataclass's fields)."""
    if method not in METHODS:
        raise UserError(f"unknown discovery method {method!r}; use one of {', '.join(METHODS)}")
    return [field.name for field in dataclasses.fields(METHODS[method].options)]


def options_of(method, **opts):
    """The options dataclass of `method` from keyword values, each validated; an option of another method is
    refused by name."""
    unknown = sorted(set(opts) - set(method_options(method)))
    if unknown:
        raise UserError(f"method {method} has no option {', '.join(unknown)}; "
                        f"its options are {', '.join(method_options(method))}")
    return METHODS[method].options(**opts)


def build(method, backbone=None, weights=None, device="auto", random_init=False, seed=0, precision="auto", **opts):
    """A discovery callable. backbone: timm name (method default when None); weights: checkpoint file;
    random_init/seed: deterministic random weights for smoke tests; precision: auto (bf16 autocast on
    CUDA, fp32 on CPU), fp32 or bf16; opts: the method's options."""
    return METHODS[method].build(options_of(method, **opts), backbone=backbone, weights=weights, device=device,
                                 random_init=random_init, seed=seed, precision=precision)
