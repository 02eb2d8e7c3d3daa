"""Stage 1: unsupervised object discovery, image -> patch-attention map.

`d = build("tokencut")` then `maps = d(imgs)`: imgs [B, 3, S, S] normalised with `d.mean/d.std`
-> maps [B, h, w] in [0, 1] on `d.grid(S)`. `d.options` holds every option that shapes the maps.
`discover(DiscoveryConfig(...))` runs a method over an image folder into an attention store.
"""
from agmae.discovery.methods import METHODS, Method, build, method_options, options_of
from agmae.discovery.run import DiscoveryConfig, discover

__all__ = ["METHODS", "Method", "build", "method_options", "options_of", "DiscoveryConfig", "discover"]
