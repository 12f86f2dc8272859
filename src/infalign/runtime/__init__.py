"""Runtime plumbing: atomic writes, the artefact cache, checkpoint I/O, loggers, the console, stop signals, run
directories, the sweeper, distributed helpers, paths and seeds. Imports nothing of infalign outside this package
(the sweeper's config check aside, imported when a sweep starts)."""
