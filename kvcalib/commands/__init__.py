"""CLI command groups. ``common`` holds the shared error handling and output helpers."""
