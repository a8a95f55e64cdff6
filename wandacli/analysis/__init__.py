"""What the stored results say, computed: masks and score sets compared, rank subspaces and
refusal directions set side by side, the results of a study gathered into rows. Returns data
and writes CSV/JSON; reporting/ draws and prints it."""
