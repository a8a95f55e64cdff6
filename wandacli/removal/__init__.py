"""What to remove: one module per kind of removal (kinds/, a registry), the one in-memory form
every removal takes and the one way it reaches a model (content.py, in_memory.py), the runs
that write masks and edits, and the selection and rank math they use."""
