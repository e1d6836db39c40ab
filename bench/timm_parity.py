"""sslvit's ViT against timm's at full size, through the weight conversion of sslvit/interop.py.

timm's ViT-S 18x2 (`vit_small_patch16_18x2_224`: ParallelThingsBlock, the paper's model) and ViT-S 36x1 with random
weights (LayerScale gammas drawn around 0.5, so that every block matters) are converted into the shipped `small` /
`small_seq` presets (stem=linear); printed per model: parameter counts on both sides, the largest difference of the
logits and of every layer's tokens (relative to each tensor's largest value; float32, eval mode), the conversion time
both ways, and whether sslvit -> timm -> sslvit gives the same bits.

    python bench/timm_parity.py                       # both presets, batch 2, 224 px
    python bench/timm_parity.py --presets vit_s18x2 --batch 4
"""

from __future__ import annotations

import argparse
import time

from common import device_line, model_preset

import jax
import numpy as np
import timm
import torch

from sslvit.interop import timm_to_variables, variables_to_timm
from sslvit.models.build import build_vit, from_flat

TIMM = {"vit_s18x2": dict(depth=18, block="parallel"), "vit_s36x1": dict(depth=36, block="sequential")}


def timm_vit(depth: int, block: str, classes: int):
    if block == "parallel":  # timm's registered model: the reference for the 18x2 architecture
        return timm.create_model("vit_small_patch16_18x2_224", num_classes=classes)
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=224,
        patch_size=16,
        embed_dim=384,
        depth=depth,
        num_heads=6,
        mlp_ratio=4.0,
        init_values=1e-5,
        num_classes=classes,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="*", default=list(TIMM), choices=list(TIMM))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--classes", type=int, default=1000)
    args = ap.parse_args()
    print(device_line() + f"; torch {torch.__version__}, timm {timm.__version__}, float32, eval mode")
    g = torch.Generator().manual_seed(0)
    x = np.random.default_rng(0).normal(size=(args.batch, 224, 224, 3)).astype(np.float32)
    for preset in args.presets:
        tm = timm_vit(**TIMM[preset], classes=args.classes).eval()
        with torch.no_grad():
            for name, t in tm.state_dict().items():
                noise = torch.randn(t.shape, generator=g)
                t.copy_(0.5 + 0.1 * noise if name.endswith("gamma") else t + 0.02 * noise)
        model = build_vit(from_flat(model_preset(preset, stem="linear")), num_classes=args.classes)
        sd = {k: v.numpy() for k, v in tm.state_dict().items()}
        t0 = time.perf_counter()
        variables = timm_to_variables(sd, model)
        t_in = time.perf_counter() - t0
        t0 = time.perf_counter()
        back = variables_to_timm(variables, model)
        t_out = time.perf_counter() - t0
        exact = all(
            np.array_equal(a, b)
            for a, b in zip(jax.tree.leaves(timm_to_variables(back, model)), jax.tree.leaves(variables))
        )

        layers = []
        hooks = [b.register_forward_hook(lambda _m, _i, out: layers.append(out.numpy())) for b in tm.blocks]
        with torch.no_grad():
            ref = tm(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
        for h in hooks:
            h.remove()
        out, feats = jax.jit(lambda v, x: model.apply(v, x, return_features=True))(variables, x)
        rel = lambda a, b: float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())  # noqa: E731
        per_layer = [rel(feats["layers"][i], layers[i]) for i in range(len(layers))]
        n_timm = sum(p.numel() for p in tm.parameters())
        n_sslvit = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(variables["params"]))
        print(
            f"{preset}: timm {n_timm:,} params, sslvit {n_sslvit:,} (timm's class-token slot in pos_embed: "
            f"{n_timm - n_sslvit:,}); logits max |diff| {float(np.abs(np.asarray(out) - ref).max()):.2e} of "
            f"max |logit| {float(np.abs(ref).max()):.2f} (relative {rel(out, ref):.1e}); per-layer tokens, "
            f"relative: max {max(per_layer):.1e}, last {per_layer[-1]:.1e}; conversion timm->sslvit "
            f"{t_in:.2f} s, sslvit->timm {t_out:.2f} s; round trip bit-exact: {exact}"
        )


if __name__ == "__main__":
    main()
