"""Models: the parallel ViT encoder, its patch stems and the masked-image-modelling wrapper."""

from sslvit.models.stems import STEMS, get_stem, hmlp_factors, register_stem
from sslvit.models.vit import ViT, resize_pos_embedding, sincos_pos_embedding

__all__ = ["STEMS", "ViT", "get_stem", "hmlp_factors", "register_stem", "resize_pos_embedding",
           "sincos_pos_embedding"]
