"""The config of `python train.py`: every key defined once, importable without torch.

- `schema` (the run's and the groups' keys) and `models` (the model and reward loaders' keys): dataclasses, one field
  per key with its type, default, rule (`rules`) and one-line meaning; `cross`: the rules between keys;
- `check`: `check_config`, the one check of a composed config, run before torch is imported;
- `python -m infalign.config --markdown` prints the reference, docs/configuration.md.

Why Hydra does not type-check at composition: its errors are several lines and exit status 1, and it knows no
ranges; every refused value here is one line `error: <key> must be <allowed> (<meaning>), got <value>; e.g. ...`
with exit status 2 (`exit_on_user_error`). So `TrainConfig`'s defaults are stored in Hydra's ConfigStore as a
plain container (`base_train`, the first entry of conf/train.yaml's defaults list), and the check compares the
composed config with the dataclasses field by field.
"""

from __future__ import annotations

from dataclasses import asdict

from infalign.config.rules import processes
from infalign.config.schema import TrainConfig
from infalign.runtime.errors import ConfigError, exit_on_user_error

__all__ = ["ConfigError", "TrainConfig", "exit_on_user_error", "processes", "store_base_config"]


def store_base_config() -> None:
    """`base_train` in Hydra's ConfigStore: the defaults of `TrainConfig` (conf/train.yaml composes it first)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="base_train", node=asdict(TrainConfig()))
