"""Language models: the offline registry and kvcalib's ragged attention path."""
