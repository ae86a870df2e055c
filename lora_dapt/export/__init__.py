"""Export: merge an adapter into a verified 16-bit model (``merge.merge_adapter``, ``merge.merge_run``)."""
