"""Configs, validated in one place.

- `checks.py`: the one vocabulary of value checks (`Integer`, `Number`, `Boolean`, `Choice`, ...) and `Group`, a
  typed config group declared as a frozen dataclass whose fields carry their checks;
- `groups.py`: the groups the stages share (`model`, `data`, `optim`, `distributed`, the training-loop keys, the
  `finetune`, `probe` and `knn` blocks);
- `stages.py`: each script's whole config (`PretrainConfig`, `FinetuneConfig`, `LinearProbeConfig`,
  `VisualizeConfig`), parsed by the stage before anything is computed.

Every bad value is one `ConfigError` line naming the key, the value and what is allowed.
"""

from sslvit.config.checks import Group, key

__all__ = ["Group", "key"]
