"""Runtime plumbing: the config schema, atomic writes, the artefact cache, checkpoint I/O, loggers, distributed
helpers, the allocator, paths (also a model's path: `model_paths`). Imports nothing of infalign outside this
package."""
