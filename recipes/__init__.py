"""Installed as mka_edge._recipes so an installed copy finds the recipes outside the checkout."""
