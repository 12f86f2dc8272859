"""Runtime plumbing: atomic writes, the artefact cache, checkpoint I/O, loggers, distributed helpers, the
allocator, paths. Imports nothing of infalign outside this package."""
