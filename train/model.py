"""The masked autoencoder (MAE, He et al. 2022) built from timm's `PatchEmbed` and `Block`.

The encoder's parameters are named exactly like timm's `VisionTransformer` (`patch_embed.proj`,
`cls_token`, `pos_embed`, `blocks.N`, `norm`) and every decoder parameter starts with `decoder_`
or is `mask_token`, so exporting the encoder is a key filter (`agmae.checkpoint.encoder_weights`).
"""
import torch
import torch.nn as nn
from timm.layers import LayerNorm, PatchEmbed
from timm.models.vision_transformer import Block
from agmae.checkpoint import load_checkpoint
from agmae.errors import UserError
from agmae.train.config import MODEL_OPTIONS


# (embed_dim, depth, num_heads) of the standard ViT sizes
_VIT_SIZES = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}

MODELS: dict[str, dict] = {
    f"mae_vit_{size}_patch{patch}": dict(patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads)
    for size, (dim, depth, heads) in _VIT_SIZES.items()
    for patch in (16, 14, 8)
}
# The demo dataset's model (docs/METHOD.md#the-mae): 64-px images, an 8x8 grid, width 128,
# 4 blocks and a 1-block decoder, 3.5x cheaper per image than the earlier 192-wide, 6-block demo MAE
# (--embed-dim 192 --depth 6 --num-heads 3 --decoder-embed-dim 128 --decoder-depth 2 --decoder-num-heads 4),
# on which guidance separated from vanilla no earlier.
MODELS["mae_vit_demo_patch8"] = dict(
    img_size=64, patch_size=8, embed_dim=128, depth=4, num_heads=4,
    decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=2,
)
DEMO_MODEL = "mae_vit_demo_patch8"


def sincos_pos_embed_2d(embed_dim: int, grid_hw: tuple[int, int], cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding, MAE's layout: `[(1 +) h*w, D]`, row-major over the grid.

    The first D/2 channels encode the column (x), the last D/2 the row (y); each half is
    `[sin(pos * omega), cos(pos * omega)]` with `omega_k = 10000^(-k / (D/4))`. The class token
    (when present) gets an all-zero row.
    """
    if embed_dim % 4:
        raise UserError(f"embed_dim={embed_dim} must be divisible by 4 for a 2-D sin-cos position embedding")
    rows, cols = torch.meshgrid(
        torch.arange(grid_hw[0], dtype=torch.float64), torch.arange(grid_hw[1], dtype=torch.float64), indexing="ij"
    )
    emb = torch.cat([_sincos_1d(embed_dim // 2, cols.flatten()), _sincos_1d(embed_dim // 2, rows.flatten())], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=emb.dtype), emb])
    return emb.float()


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """pos: [M] -> [M, dim]"""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = pos[:, None] * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class MaskedAutoencoderViT(nn.Module):
    """ViT encoder on the visible patches + a light transformer decoder that predicts every patch's pixels."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        fused_attn: bool | None = None,
    ):
        super().__init__()
        if img_size % patch_size:
            raise UserError(f"image size {img_size} is not a multiple of the patch size {patch_size}")
        for part, width, heads in (("encoder", embed_dim, num_heads), ("decoder", decoder_embed_dim, decoder_num_heads)):
            if width % heads:
                raise UserError(f"the {part}'s {heads} heads do not divide its width {width}; choose a head "
                                 "count that divides the width (--num-heads / --decoder-num-heads)")
        self.encoder_kwargs = dict(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans,
            embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
        )
        self.patch_size = patch_size
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        num_patches = self.grid_size[0] * self.grid_size[1]

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm) for _ in range(depth)]
        )
        self.norm = LayerNorm(embed_dim)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [
                Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm)
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = LayerNorm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans)

        self._init_weights()
        if fused_attn is not None:
            self.set_fused_attn(fused_attn)

    def _init_weights(self) -> None:
        """MAE's initialisation: fixed sin-cos positions, xavier-uniform linears (the patch
        projection treated as one), N(0, 0.02) tokens, unit LayerNorms."""
        self.pos_embed.data.copy_(sincos_pos_embed_2d(self.pos_embed.shape[-1], self.grid_size)[None])
        self.decoder_pos_embed.data.copy_(sincos_pos_embed_2d(self.decoder_pos_embed.shape[-1], self.grid_size)[None])
        proj = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(proj.view(proj.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def set_fused_attn(self, enabled: bool) -> None:
        """Switch every block between `F.scaled_dot_product_attention` and timm's matmul-softmax path
        (at a few dozen tokens the latter is faster on CPU; benchmarks/train_bench.py measures it)."""
        for block in [*self.blocks, *self.decoder_blocks]:
            block.attn.fused_attn = enabled

    def no_weight_decay(self) -> set[str]:
        """Parameters kept out of weight decay besides norms and biases (timm's convention)."""
        return {"cls_token", "mask_token"}

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs: [N, 3, H, W] -> [N, L, p*p*3], each patch's pixels in (row, column, channel) order."""
        p = self.patch_size
        n, c, height, width = imgs.shape
        h, w = height // p, width // p
        x = imgs.reshape(n, c, h, p, w, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(n, h * w, p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, L, p*p*3] -> imgs: [N, 3, H, W]"""
        p = self.patch_size
        h, w = self.grid_size
        n = x.shape[0]
        x = x.reshape(n, h, w, p, p, -1)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(n, x.shape[1], h * p, w * p)

    @staticmethod
    def random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        """Per-sample random masking: keep the patches with the smallest noise.

        x: [N, L, D], noise: [N, L] in [0, 1) (drawn here when None), or any values whose order picks the
        masked patches (agmae.train.masking)
        returns x_visible: [N, L_keep, D], mask: [N, L] (1 = masked), ids_restore: [N, L]
        """
        n, length, dim = x.shape
        len_keep = int(length * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(n, length, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
        mask = torch.ones(n, length, device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return x_visible, mask, ids_restore

    def _embed(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs: [N, 3, H, W] -> patch tokens with positions: [N, L, D]"""
        return self.patch_embed(imgs) + self.pos_embed[:, 1:, :]

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, L', D] position-embedded patch tokens -> [N, 1 + L', D] after the class token, blocks and norm"""
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """The encoder on the whole, unmasked image (what timm's `forward_features` computes).

        imgs: [N, 3, H, W] -> [N, 1 + L, D]
        """
        return self._encode(self._embed(imgs))

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        """imgs: [N, 3, H, W] -> latent: [N, 1 + L_keep, D], mask: [N, L], ids_restore: [N, L]"""
        x, mask, ids_restore = self.random_masking(self._embed(imgs), mask_ratio, noise)
        return self._encode(x), mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """x: [N, 1 + L_keep, D], ids_restore: [N, L] -> pred: [N, L, p*p*3]"""
        x = self.decoder_embed(x)
        n, length = ids_restore.shape
        mask_tokens = self.mask_token.expand(n, length + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1, :], patches], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None):
        """imgs: [N, 3, H, W], noise: [N, L] -> pred: [N, L, p*p*3], mask: [N, L] (1 = masked)"""
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        return self.forward_decoder(latent, ids_restore), mask


def create_model(name: str, **overrides) -> MaskedAutoencoderViT:
    """A preset from `MODELS` (e.g. `mae_vit_base_patch16`), any constructor argument overridable
    (`img_size`, `patch_size`, `embed_dim`, `depth`, `num_heads`, `decoder_*`, `fused_attn`)."""
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(sorted(MODELS))}")
    kwargs = {**MODELS[name], **{k: v for k, v in overrides.items() if v is not None}}
    return MaskedAutoencoderViT(**kwargs)


def load_mae(path) -> MaskedAutoencoderViT:
    """The whole MAE (encoder and decoder) of an agmae-train checkpoint, on the CPU in eval mode: the preset, input
    size and model options its config records, then its weights (strict)."""
    loaded = load_checkpoint(path)
    config = loaded.get("config") if isinstance(loaded, dict) else None
    if not isinstance(config, dict) or "model" not in config or not isinstance(loaded.get("model"), dict):
        raise UserError(f"{path}: records no MAE (no model name in its config); pass an agmae-train checkpoint "
                        f"(RUN_DIR/checkpoint-last.pth): an exported encoder holds no decoder")
    model = create_model(config["model"], img_size=config.get("input_size"),
                         **{name: config.get(name) for name in MODEL_OPTIONS})
    try:
        model.load_state_dict(loaded["model"])
    except RuntimeError as err:
        first = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
        raise UserError(f"{path}: its weights do not fit the MAE its config describes ({first[:200]})") from None
    return model.eval()
