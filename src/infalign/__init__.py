"""InfAlign: inference-aware language-model alignment (calibrate-and-transform RL)."""
from infalign.runtime.paths import register_resolvers as _register_resolvers

# Configs use ${infalign.data_root:} / ${infalign.cache_root:}; any `import infalign.<x>` registers them.
_register_resolvers()
