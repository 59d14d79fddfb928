"""The model math: loading, the prefill forward pass, the decode batch's slab, sampling and output text."""
