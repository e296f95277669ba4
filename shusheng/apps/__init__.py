"""User-facing layers: the ``shusheng`` command line (``shusheng.apps.cli``) and, later, the Gradio app.

Nothing here holds model logic; commands call the public APIs of the other subpackages.
"""
