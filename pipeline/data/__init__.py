"""The data: reading the archive, decoding, validation suites, the split, glyph helpers."""
