"""Runs: checked requests, run cards on disk, previews, and the app's lab."""
