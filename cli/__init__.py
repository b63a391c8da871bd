"""The instabatch command (Typer + Rich): cli.main:app."""
