"""Independent recomputation of a timm ViT's last-block queries and keys from its weights,
the reference that the `dino` and `tokencut` tests compare the discovery code against."""
import torch


def last_block_qk(model, imgs):
    """q, k of the last block's attention from its own qkv weights: each [B, heads, tokens, head_dim]."""
    block = model.blocks[-1]
    taken = []
    handle = block.register_forward_pre_hook(lambda _m, args: taken.append(args[0]))
    try:
        with torch.no_grad():
            model.forward_features(imgs)
    finally:
        handle.remove()
    with torch.no_grad():
        tokens = block.norm1(taken[0])
        qkv = tokens @ block.attn.qkv.weight.T + block.attn.qkv.bias
        q, k, _ = qkv.reshape(*tokens.shape[:2], 3, block.attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    return q, k
