"""The try-it page at / (issue 10): static files shipped in the package and their one view module."""
