"""The team dashboard: one page served at `/`, with its script and style sheet, all from this package."""
