"""The config of `python train.py`: every key defined once (`schema`; the groups a `_target_` builds in `models`),
checked before torch is imported (`check`; the rules between keys in `between`), its reference printed by
`python -m infalign.config --markdown` (docs/configuration.md).

Hydra's own type errors are several lines with exit status 1, and Hydra knows no ranges: so the run's defaults are
stored in Hydra's ConfigStore as plain data (`base_train`, first in conf/train.yaml's defaults list), and the check
refuses a value in one line, `error: <key> must be <allowed> (<meaning>), got <value>; e.g. ...`, exit status 2.
"""

from __future__ import annotations

from infalign.config.rules import processes
from infalign.config.schema import RUN, defaults
from infalign.runtime.errors import ConfigError, exit_on_user_error

__all__ = ["RUN", "ConfigError", "exit_on_user_error", "processes", "store_base_config"]


def store_base_config() -> None:
    """`base_train` in Hydra's ConfigStore: the run's defaults (conf/train.yaml composes it first)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="base_train", node=defaults(RUN))
