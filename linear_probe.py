"""Linear probe (+ k-NN) of a pretrained encoder's frozen features. Examples:

python linear_probe.py run=outputs/pretrain/<run>
python linear_probe.py run=outputs/pretrain/<run> random_init=true          # the untrained baseline
python linear_probe.py run=outputs/pretrain/<run> pool=cls layers=[2,4,6]
python linear_probe.py run=outputs/pretrain/<run> data=folder data.path=/my/images
"""

import json

import hydra
from omegaconf import DictConfig

from sslvit.cli import run_main, script_main


def _main(cfg, out_dir):
    from sslvit.distributed import maybe_initialize  # noqa: PLC0415

    maybe_initialize(cfg.get("distributed"))  # multi-process (SLURM / explicit); before any other JAX call
    from sslvit.probe import format_table, linear_probe  # noqa: PLC0415  (after Hydra parsed: --help stays fast)

    results = linear_probe(cfg, out_dir)
    print(format_table(results))
    print(f"results: {out_dir / 'results.json'}")
    print(json.dumps({k: results[k] for k in ("best_layer", "best_top1", "best_knn_top1", "top1", "knn_top1")}))
    return results


@hydra.main(config_path="conf", config_name="linear_probe", version_base="1.3")
def main(cfg: DictConfig):
    return run_main(_main, cfg)


if __name__ == "__main__":
    script_main(main, __file__, "linear_probe")
