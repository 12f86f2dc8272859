"""InfAlign: inference-aware language-model alignment (calibrate-and-transform RL)."""
from infalign.config import store_base_config as _store_base_config
from infalign.runtime.paths import register_resolvers as _register_resolvers

# Configs use ${infalign.data_root:} / ${infalign.cache_root:}; any `import infalign.<x>` registers them.
_register_resolvers()
# conf/train.yaml composes `base_train` first: infalign.config's defaults, stored in Hydra's ConfigStore
_store_base_config()
