"""Masked-patch (BEiT-style) pretraining of a parallel ViT. Examples:

python pretrain.py                                  # CIFAR-10, tiny 6x2 model, hMLP stem, k-means tokens
python pretrain.py stem=hmlp mask_ratio=0.4
python pretrain.py -m stem=linear,conv,hmlp mask_ratio=0.4,0.6
python pretrain.py resume=true hydra.run.dir=outputs/pretrain/<run>
"""

import json

import hydra
from omegaconf import DictConfig

from sslvit.cli import run_main, script_main


def _main(cfg, run_dir):
    from sslvit.distributed import maybe_initialize  # noqa: PLC0415

    maybe_initialize(cfg.get("distributed"))  # multi-process (SLURM / explicit); before any other JAX call
    from sslvit.pretraining import pretrain  # noqa: PLC0415  (after Hydra parsed: --help stays fast)

    results = pretrain(cfg, run_dir)
    print(f"run dir: {run_dir}")
    print(json.dumps(results, indent=2))
    return results


@hydra.main(config_path="conf", config_name="pretrain", version_base="1.3")
def main(cfg: DictConfig):
    return run_main(_main, cfg)


if __name__ == "__main__":
    script_main(main, __file__, "pretrain")
