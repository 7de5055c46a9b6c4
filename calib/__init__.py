"""kvcalib's library core. Data flow, one module per stage:

documents/tasks → capture (prefill) → scorers → budget (allocation) → cache (compress) → generate (decode)
→ engine (the whole pipeline).
"""
