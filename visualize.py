"""Draw what a pretrained masked-image model predicts on a few test images: the image, its mask, and at the masked
patches the target and the prediction (k-means tokens as their codebook patches, or pixels). Examples:

    python visualize.py run=outputs/pretrain/<run>
    python visualize.py run=outputs/pretrain/<run> num_images=16 seed=1 out=pred.png
"""

import hydra
from omegaconf import DictConfig, OmegaConf

from sslvit.cli import run_main, script_main


def _main(cfg, _run_dir):
    from sslvit.visualize import visualize  # noqa: PLC0415  (after Hydra parsed: --help stays fast)

    result = visualize(OmegaConf.to_container(cfg, resolve=True))
    print(result["title"])
    print(f"wrote {result['path']}")
    return result


@hydra.main(config_path="conf", config_name="visualize", version_base="1.3")
def main(cfg: DictConfig):
    return run_main(_main, cfg)


if __name__ == "__main__":
    script_main(main, __file__, "visualize")
