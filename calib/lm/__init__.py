"""Language models: the offline registry, kvcalib's ragged attention path, and the model/tokenizer Protocols."""
