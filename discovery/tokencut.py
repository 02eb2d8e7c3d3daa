"""`tokencut`: normalised cut on the token-similarity graph, batched on the backbone's device.

The generalised problem (D - W) v = λ D v is solved through the symmetric normalised Laplacian
L_sym = I - D^-1/2 W D^-1/2 (eigenvector u, v = D^-1/2 u). Two solvers (docs/METHOD.md#tokencut):
`exact`, float64, one batched `torch.linalg.eigh` of the N x N Laplacians on a GPU and LAPACK's single-eigenvector
driver per graph on a CPU; `iterative`, float32 block subspace iteration made of batched matmuls, whose
unconverged graphs fall back to `exact`; `auto` (the default), `iterative` on a GPU, where batched matmuls are cheap
and a batched eigh is not, and `exact` on a CPU, where LAPACK's driver wins.
"""
from dataclasses import dataclass

import click
import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F

from agmae.discovery.backbones import load_backbone
from agmae.discovery.base import Discoverer, layer_option, to_grid
from agmae.errors import UserError
from agmae.options import option, validate

FG_RULES = ("seed", "border")
SOLVERS = ("auto", "exact", "iterative")
# Subspace iteration: block width, steps between convergence checks, most steps, and the residual
# |A u - θ u| (u unit) under which a graph's Fiedler vector counts as converged.
BLOCK, CHECK_EVERY, MAX_STEPS, RESIDUAL_TOL = 8, 10, 200, 1e-5
GRAPHS = ("binary", "weighted")
OUTPUTS = ("soft", "mask")
VIT_DEFAULTS = {"tau": 0.2, "center": False, "fg_rule": "seed", "image_size": 224}
# Measured with the offline EfficientNet-Lite0 on the demo `original` split (experiments/discovery_quality.py):
# mean-centred features at τ_tc = 0, the border rule and 448 px beat every other combination tried, and
# the 192-channel stage before the head (blocks.5) beats the head features (bn2) and blocks.4.
CNN_DEFAULTS = {"tau": 0.0, "center": True, "fg_rule": "border", "image_size": 448}
CNN_DEFAULT_LAYERS = {"EfficientNet": "blocks.5"}


@dataclass
class TokenCutOptions:
    tau: float | None = option(None, "Similarity threshold τ_tc of the graph. [default: 0.2 for a ViT, 0 for a CNN]",
                               type=click.FloatRange(-1, 1, max_open=True))
    eps: float = option(1e-5, "Weight of the edges below τ_tc.", type=click.FloatRange(0, min_open=True))
    graph: str = option("binary", "Edges above τ_tc weigh 1 (binary) or their similarity (weighted).",
                        type=click.Choice(GRAPHS))
    output: str = option("soft", "The aligned Fiedler vector (soft) or the seed's 4-connected foreground component "
                                 "as 0/1 (mask).", type=click.Choice(OUTPUTS))
    fg_rule: str | None = option(None, "The foreground side holds argmax|v| (seed) or touches fewer border cells "
                                       "(border). [default: seed for ViTs, border for CNNs, measured better there]",
                                 type=click.Choice(FG_RULES))
    center: bool | None = option(None, "Subtract each image's mean feature first. [default: on for CNNs, off for "
                                       "ViT keys]", flags=("--center/--no-center",))
    layer: str | None = layer_option()
    solver: str = option("auto", "Fiedler vectors by one batched float64 eigh (exact) or by float32 subspace "
                                 "iteration made of batched matmuls, exact where it does not converge (iterative; "
                                 "far cheaper at 784 tokens, docs/PERFORMANCE.md); auto: iterative on a GPU, exact "
                                 "on a CPU (the store records which ran).", type=click.Choice(SOLVERS))

    def __post_init__(self):
        validate(self)


def border_cells(grid, device):
    """grid: (h, w) -> [h*w] bool, True on the outermost ring of cells."""
    cells = torch.zeros(grid, dtype=torch.bool, device=device)
    cells[0], cells[-1], cells[:, 0], cells[:, -1] = True, True, True, True
    return cells.flatten()


def graph_weights(feats, tau=0.2, eps=1e-5, binary=True, dtype=torch.float64):
    """feats: [B, N, C] raw tokens -> W: [B, N, N] in `dtype`, the cosine similarities of the L2-normalised
    tokens thresholded at tau (1 above it, or the similarity when not binary; eps below it)."""
    tokens = F.normalize(feats.to(dtype), dim=-1)
    sim = tokens @ tokens.transpose(1, 2)
    return torch.where(sim > tau, torch.ones_like(sim) if binary else sim, torch.full_like(sim, eps))


def normalised_laplacian(weights):
    """weights: [B, N, N] graph -> (D^-1/2 [B, N], L_sym = I - D^-1/2 W D^-1/2 [B, N, N])"""
    inv_sqrt_degree = weights.sum(-1).rsqrt()
    return inv_sqrt_degree, torch.eye(weights.shape[-1], dtype=weights.dtype, device=weights.device) - (
        inv_sqrt_degree[:, :, None] * weights * inv_sqrt_degree[:, None, :])


def fiedler_batched(weights):
    """weights: [B, N, N] float64 graph -> v = D^-1/2 u, u the unit eigenvector of L_sym's second-smallest
    eigenvalue, from one dense batched eigendecomposition (all N eigenvectors)."""
    inv_sqrt_degree, laplacian = normalised_laplacian(weights)
    return inv_sqrt_degree * torch.linalg.eigh(laplacian)[1][..., 1]


def resolve_solver(solver: str, device) -> str:
    """The solver `auto` stands for on `device`: iterative on CUDA, exact elsewhere; others unchanged."""
    if solver not in SOLVERS:
        raise UserError(f"tokencut solver={solver!r}: use one of {SOLVERS}")
    if solver != "auto":
        return solver
    return "iterative" if torch.device(device).type == "cuda" else "exact"


def fiedler_exact(weights):
    """fiedler_batched's vectors: on a GPU from fiedler_batched itself; on a CPU from LAPACK's MRRR driver
    (dsyevr), graph by graph, which computes that one eigenvector instead of all N. On the demo MAE's graphs the
    solve is 2-3.5x faster on one thread, and whole discovery 1.3-1.5x at 256 nodes, 1.0-1.3x at 144; on two
    threads scipy's own BLAS threads make small solves erratic (benchmarks/fiedler_bench.py, 196 nodes: 0.4-1.3x
    the batched eigh's speed, 2.4-2.9x at 784). The graphs are solved one after the other: scipy's LAPACK wrappers
    hold the GIL, so threads would not run them side by side."""
    if weights.device.type != "cpu":
        return fiedler_batched(weights)
    inv_sqrt_degree, laplacian = normalised_laplacian(weights)
    second = [scipy.linalg.eigh(graph, subset_by_index=[1, 1], driver="evr")[1][:, 0] for graph in laplacian.numpy()]
    return inv_sqrt_degree * torch.from_numpy(np.array(second).reshape(laplacian.shape[:2]))


def fiedler_iterative(weights, block=BLOCK, max_steps=MAX_STEPS, tol=RESIDUAL_TOL):
    """weights: [B, N, N] float32 graph -> (v [B, N] as fiedler_exact's, converged [B] bool).

    L_sym's second-smallest eigenvector is the top eigenvector of A = D^-1/2 W D^-1/2 + I (shifted so its
    spectrum lies in [0, 2]) once A's known top eigenvector D^1/2 1 is deflated: block subspace iteration
    on A, QR re-orthonormalisation, and a batched Rayleigh-Ritz on the small block every CHECK_EVERY steps,
    until every graph's residual is under tol or max_steps."""
    degree = weights.sum(-1)
    inv_sqrt_degree = degree.rsqrt()[..., None]
    trivial = F.normalize(degree.sqrt(), dim=-1)[..., None]  # [B, N, 1]

    def apply(x):
        return inv_sqrt_degree * (weights @ (inv_sqrt_degree * x)) + x

    def deflated(x):
        return x - trivial @ (trivial.transpose(1, 2) @ x)

    generator = torch.Generator(device=weights.device).manual_seed(0)
    x = torch.randn(weights.shape[0], weights.shape[1], block, generator=generator, device=weights.device)
    x = torch.linalg.qr(deflated(x))[0]
    for step in range(1, max_steps + 1):
        x = torch.linalg.qr(deflated(apply(x)))[0]
        if step % CHECK_EVERY == 0 or step == max_steps:
            applied = apply(x)
            theta, ritz = torch.linalg.eigh(x.transpose(1, 2) @ applied)  # [B, block, block]: small
            u = x @ ritz[..., -1:]
            residual = (applied @ ritz[..., -1:] - theta[..., -1:, None] * u).norm(dim=1)[:, 0]
            if bool((residual < tol).all()):
                break
    return (inv_sqrt_degree * u)[..., 0], residual < tol


def fiedler(weights, solver="auto"):
    """The Fiedler vectors [B, N] (float64) of graphs `weights` by `solver` (see SOLVERS; `auto` by the weights'
    device).

    exact works in float64 on every device: on a GPU a float32 eigh lost parity with scipy (a partition
    flipped) and was slower too (docs/PERFORMANCE.md#discovery).
    iterative works in float32 and solves exactly, in float64, only the graphs it did not converge on."""
    if resolve_solver(solver, weights.device) == "exact":
        return fiedler_exact(weights.double())
    eigvec, converged = fiedler_iterative(weights.float())
    eigvec = eigvec.double()
    if not bool(converged.all()):
        eigvec[~converged] = fiedler_exact(weights[~converged].double())
    return eigvec


def ncut(feats, tau=0.2, eps=1e-5, binary=True, fg_rule="seed", grid=None, solver="auto"):
    """Fiedler vector of the token graph and its foreground side.

    feats: [B, N, C] raw tokens (L2-normalised here) -> eigvec: [B, N] sign-aligned so that the
    foreground is where it is large, foreground: [B, N] bool (eigvec > its mean, then aligned).
    fg_rule "seed": the side holding argmax |v| is the foreground (TokenCut); "border": the side
    touching fewer cells of the grid's outer ring (`grid` (h, w), default square); ties keep "seed".
    solver: "exact" (float64 eigh), "iterative" (float32 subspace iteration, exact where it does not
    converge) or "auto" (iterative on CUDA, exact elsewhere).
    """
    if fg_rule not in FG_RULES:
        raise UserError(f"tokencut fg_rule={fg_rule!r}: use one of {FG_RULES}")
    solver = resolve_solver(solver, feats.device)
    dtype = torch.float64 if solver == "exact" else torch.float32
    eigvec = fiedler(graph_weights(feats, tau, eps, binary, dtype), solver)
    foreground = eigvec > eigvec.mean(-1, keepdim=True)
    seed = eigvec.abs().argmax(-1, keepdim=True)
    flip = ~foreground.gather(-1, seed)
    if fg_rule == "border":
        n = eigvec.shape[-1]
        ring = border_cells(grid or (int(n ** 0.5),) * 2, eigvec.device)
        fg_ring = (foreground & ring).sum(-1, keepdim=True)
        bg_ring = (~foreground & ring).sum(-1, keepdim=True)
        flip = torch.where(fg_ring == bg_ring, flip, fg_ring > bg_ring)
    eigvec = torch.where(flip, -eigvec, eigvec)
    foreground = foreground ^ flip
    return eigvec.to(feats.dtype), foreground


def seed_component(foreground, seed):
    """The 4-connected component of the foreground that holds the seed cell, grown for the whole batch at once.

    foreground: [B, h, w] bool, seed: [B] flat cell index -> [B, h, w] bool
    """
    component = torch.zeros_like(foreground).flatten(1)
    component[torch.arange(len(seed)), seed] = True
    component = component.view_as(foreground) & foreground
    while True:
        padded = F.pad(component.to(torch.uint8), (1, 1, 1, 1)).bool()
        grown = foreground & (component | padded[:, :-2, 1:-1] | padded[:, 2:, 1:-1]
                              | padded[:, 1:-1, :-2] | padded[:, 1:-1, 2:])
        if torch.equal(grown, component):
            return component
        component = grown


class TokenCut(Discoverer):
    method = "tokencut"

    def __init__(self, backbone, options: TokenCutOptions):
        defaults = VIT_DEFAULTS if backbone.kind == "vit" else CNN_DEFAULTS
        tau, center, layer = options.tau, options.center, options.layer
        fg_rule = defaults["fg_rule"] if options.fg_rule is None else options.fg_rule
        if backbone.kind == "vit" and layer is not None:
            backbone.module(layer)
        if backbone.kind == "cnn":
            layer = layer or CNN_DEFAULT_LAYERS.get(type(backbone.model).__name__) or backbone.head_layer()
            backbone.module(layer)
        self.default_image_size = defaults["image_size"]
        super().__init__(backbone, {
            "features": "keys" if backbone.kind == "vit" and layer is None else layer,
            "tau": defaults["tau"] if tau is None else float(tau),
            "eps": float(options.eps),
            "graph": options.graph,
            "output": options.output,
            "fg_rule": fg_rule,
            "center": defaults["center"] if center is None else bool(center),
            "solver": resolve_solver(options.solver, backbone.device),
        })

    def grid(self, size):
        layer = None if self.backbone.kind == "vit" else self.options["features"]
        return self.backbone.grid(size, layer)

    def tokens(self, imgs):
        """imgs: [B, 3, S, S] -> [B, N, C] graph nodes: for a ViT the last block's keys (heads concatenated),
        or the tokens a named module outputs (e.g. `norm`: the final tokens), prefix tokens dropped; for a
        CNN the chosen stage's cells."""
        prefix = self.backbone.model.num_prefix_tokens if self.backbone.kind == "vit" else 0
        if self.options["features"] == "keys":
            _, k = self.backbone.last_qk(imgs)
            feats = k[:, :, prefix:].transpose(1, 2).flatten(2)
        elif self.backbone.kind == "vit":
            feats = self.backbone.features(imgs, self.options["features"])[:, prefix:]
        else:
            feats = self.backbone.features(imgs, self.options["features"]).flatten(2).transpose(1, 2)
        if self.options["center"]:
            feats = feats - feats.mean(1, keepdim=True)
        return feats

    def compute(self, imgs, keys=None, labels=None):
        grid = self.grid(imgs.shape[-1])
        opts = self.options
        eigvec, foreground = ncut(self.tokens(imgs), tau=opts["tau"], eps=opts["eps"],
                                  binary=opts["graph"] == "binary", fg_rule=opts["fg_rule"], grid=grid,
                                  solver=opts["solver"])
        if opts["output"] == "soft":
            return to_grid(eigvec, grid)
        seed = torch.where(foreground, eigvec.abs(), -1.0).argmax(-1)
        return seed_component(to_grid(foreground, grid), seed).float()


def build(options: TokenCutOptions, backbone=None, weights=None, device="auto", random_init=False, seed=0,
          precision="auto"):
    return TokenCut(load_backbone(backbone, weights, random_init, seed, device, precision=precision), options)
