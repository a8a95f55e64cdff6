"""The one loader (the only `from_pretrained`), model sources, decoder layers, the organism."""
