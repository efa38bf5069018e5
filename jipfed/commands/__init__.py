"""Sub-commands of the ``jipfed`` CLI; each module exposes ``add_parser`` and ``run``."""
