"""Vendored data slices (see LICENSES.md next to this file)."""
