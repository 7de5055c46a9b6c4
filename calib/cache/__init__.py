"""The compressed cache: ragged per-head storage, decoding through it, decode-time policies (MorphKV), export."""
