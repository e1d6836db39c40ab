"""Models: the parallel ViT encoder, its patch stems, the masked-image-modelling wrapper, and the encoder's
description that rebuilds it (`build_vit`)."""

from sslvit.models.build import build_vit, encoder_config, encoder_from_meta
from sslvit.models.ops import resize_pos_embedding, sincos_pos_embedding
from sslvit.models.stems import STEMS, get_stem, hmlp_factors, register_stem
from sslvit.models.vit import ViT

__all__ = [
    "STEMS",
    "ViT",
    "build_vit",
    "encoder_config",
    "encoder_from_meta",
    "get_stem",
    "hmlp_factors",
    "register_stem",
    "resize_pos_embedding",
    "sincos_pos_embedding",
]
