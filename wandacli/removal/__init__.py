"""What to remove: masks (selection math, pure arrays), rank edits, and the one interface
every consumer applies."""
