"""The generic score run (lock, resume, sample loop, checkpoints, assembly) and data parallelism."""
