"""Compare, report, figures, terminal rendering, and one registry of labels."""
