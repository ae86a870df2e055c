"""Evaluation: the one scorer (``score``), forgetting before/after, greedy generation, the run report.

Import from the submodules (``from lora_dapt.evaluate.score import evaluate_texts``); the public names of
the package (``perplexity``, ``EvalResult``) are re-exported by :mod:`lora_dapt` itself.
"""
