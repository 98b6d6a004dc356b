"""Quantized KV: the precisions (:mod:`.schemes`), ``kv_dtype`` per tier (:mod:`.precision`) and the store that
keeps a tier's KV quantized with its newest tokens in full precision (:mod:`.store`)."""
