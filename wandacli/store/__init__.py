"""The whole on-disk schema: formats and versions, open/validate/assemble, lock, checkpoint
parts, inspect. Nothing outside this package opens an HDF5 file of the store."""
