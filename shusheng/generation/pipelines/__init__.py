"""Pipelines of the text-to-image family that use other families' pipelines: the faithfulness check
(:mod:`shusheng.generation.pipelines.faithfulness`, judged by the unified decoder's VQA pipeline)."""
