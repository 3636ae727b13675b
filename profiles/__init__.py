"""Installed as mka_edge._profiles so an installed copy finds the profiles outside the checkout."""
