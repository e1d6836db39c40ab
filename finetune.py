"""Fine-tune a pretrained encoder (or train from scratch) on labelled images. Examples:

python finetune.py run=outputs/pretrain/<run>                                 # full fine-tuning
python finetune.py run=outputs/pretrain/<run> finetune.mode=attn_only         # the paper's finding 2
python finetune.py run=outputs/pretrain/<run> finetune.image_size=48          # 32 -> 48 px
python finetune.py run=null optim.layer_decay=null                            # from scratch (baseline)
python finetune.py run=... resume=true hydra.run.dir=outputs/finetune/<run>
"""

import json

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from sslvit.cli import run_main, script_main


def _main(cfg, run_dir):
    from sslvit.distributed import maybe_initialize  # noqa: PLC0415

    maybe_initialize(cfg.get("distributed"))  # multi-process (SLURM / explicit); before any other JAX call
    from sslvit.finetune import finetune  # noqa: PLC0415  (after Hydra parsed: --help stays fast)

    # The command-line overrides tell which model options the user set on purpose (checked against the run).
    results = finetune(cfg, run_dir, overrides=list(HydraConfig.get().overrides.task))
    print(f"run dir: {run_dir}")
    print(json.dumps({k: v for k, v in results.items() if k != "model"}, indent=2))
    return results


@hydra.main(config_path="conf", config_name="finetune", version_base="1.3")
def main(cfg: DictConfig):
    return run_main(_main, cfg)


if __name__ == "__main__":
    script_main(main, __file__, "finetune")
