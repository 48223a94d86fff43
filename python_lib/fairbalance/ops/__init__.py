"""Running fairbalance in a flow: the ``fairbalance`` command (``cli``; the capabilities as commands in
``commands``, shared with pipeline files), pipeline files (``pipeline_file`` reads and checks them, ``pipeline`` runs them), the balance gate (``gate``),
export for a trainer elsewhere (``export``) and the end-to-end demo (``demo``). The top layer: it may
import every other subpackage.
"""
