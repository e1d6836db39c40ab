"""Export the encoder of a pretraining or fine-tuning run to timm (a .safetensors state dict). Examples:

    python export_timm.py run=outputs/pretrain/<run>                        # -> <run>/timm_step<N>.safetensors
    python export_timm.py run=outputs/finetune/<run> out=vit_cifar.safetensors step=2000

It prints the Python lines that build the timm VisionTransformer and load the file.
"""

import hydra
from omegaconf import DictConfig

from sslvit.cli import run_main


def _main(cfg, _run_dir):
    from sslvit.config.stages import ExportTimmConfig  # noqa: PLC0415
    from sslvit.interop import export_run  # noqa: PLC0415  (after Hydra parsed: --help stays fast)

    c = ExportTimmConfig.parse(cfg)
    path, kwargs, snippet = export_run(c.run, c.out, c.step, head=c.head)
    print(f"wrote {path} (timm VisionTransformer: {', '.join(f'{k}={v}' for k, v in kwargs.items())})")
    print("load it in PyTorch with timm:\n")
    print(snippet)
    return {"path": str(path), "timm_kwargs": kwargs}


@hydra.main(config_path="conf", config_name="export_timm", version_base="1.3")
def main(cfg: DictConfig):
    return run_main(_main, cfg)


if __name__ == "__main__":
    main()
