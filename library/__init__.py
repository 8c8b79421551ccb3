"""Shared training and model code of the suite."""
