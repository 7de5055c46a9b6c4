"""Documents and data: bundled text, prompt layout, chunking, synthetic tasks, corpora, JSONL."""
