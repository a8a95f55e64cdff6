"""What every layer uses: errors, the console, atomic files and directories, fingerprints,
memory, paths, the one file-safe naming rule, provenance, the reference's constants."""
