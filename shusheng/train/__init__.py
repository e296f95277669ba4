"""Training entry points (``shusheng train ...``). Inference code never imports this package."""
