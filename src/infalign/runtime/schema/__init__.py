"""The schema of `python train.py`'s config: every key a user can set (its type, range, meaning and an example)
and the rules between keys, checked before torch, Lightning or any model is imported.

Why a module of its own that imports the standard library and omegaconf only (and two torch-free modules of
`infalign.runtime`, `model_paths` and `artifacts`, for the keys that name files): `train.py` applies it first, so
a bad value fails about a second after the command (Hydra's start-up included) instead of after the ~10 s that
importing torch and Lightning takes, or after the models were built. `infalign.trainer.config.validate_config`
calls it too, so an in-process `run(cfg)` gets the same checks, then adds the few that need torch-importing
modules (a model or reward config's keys against its loader's signature, LoRA's peft, the generation keys
that are `GenerationConfig` fields). A model folder that does not exist and a cache root that cannot be written
are refused here too.

A refused value raises `ConfigError`: one line naming the key, what is allowed, the value and an example.
A value that is valid but pointless is an error where the run would spend its time for nothing
(`optimizer.lr=0` trains nothing) and a warning where it only loses a diagnostic or some speed
(`check_config` returns them). README, "Errors you may see", lists both.

The package: `rules` (value rules, mirrored constants), `keys` (the per-key table `KEYS` and the sections'
tables), `fields` (each key on its own), `files` (the keys that name files), `cross` (the rules between keys),
`check` (the warnings and the entry points).
"""

from infalign.runtime.schema.check import WARNINGS, check_config, check_run_options, optimizer_steps, report_warnings
from infalign.runtime.schema.cross import CROSS_RULES
from infalign.runtime.schema.fields import processes
from infalign.runtime.schema.keys import (
    CALIBRATORS,
    CLOSED,
    HINTS,
    KEYS,
    RAW_TRANSFORMS,
    RETIRED,
    SET_BY_RUN,
    TARGET_KEYS,
    TOP_LEVEL,
    Key,
)
from infalign.runtime.schema.rules import (
    ACCELERATORS,
    BOOL,
    HYDRA_KEYS,
    INSTANTIATED,
    KL_PENALTY_MODES,
    PARTITIONS,
    PRECISIONS,
    RL_ALGOS,
    SAMPLERS,
    SEED,
    SEED_MAX,
    TARGET,
    TEXT,
    ConfigError,
    Rule,
    exit_on_user_error,
    integer,
    list_of,
    nullable,
    number,
    one_of,
)

__all__ = ["KEYS", "ConfigError", "Key", "check_config", "check_run_options", "exit_on_user_error", "optimizer_steps",
           "processes", "report_warnings",
           # the tables, rules and mirrored constants, importable from here as before the package split
           "ACCELERATORS", "BOOL", "CALIBRATORS", "CLOSED", "CROSS_RULES", "HINTS", "HYDRA_KEYS", "INSTANTIATED",
           "KL_PENALTY_MODES", "PARTITIONS", "PRECISIONS", "RAW_TRANSFORMS", "RETIRED", "RL_ALGOS", "SAMPLERS", "SEED",
           "SEED_MAX", "SET_BY_RUN", "TARGET", "TARGET_KEYS", "TEXT", "TOP_LEVEL", "WARNINGS", "Rule", "integer",
           "list_of", "nullable", "number", "one_of"]
