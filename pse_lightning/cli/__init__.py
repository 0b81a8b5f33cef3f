"""The command line: configuration checks before any heavy import, errors, help.

Nothing here imports torch at module level: ``--help``, ``--cfg job``, tab completion and
config errors answer from Hydra, OmegaConf and parsed source alone.
"""
