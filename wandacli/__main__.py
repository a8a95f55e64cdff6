"""`python -m wandacli` (also the entry point torchrun uses)."""

from wandacli.cli.main import main

if __name__ == "__main__":
    main()
