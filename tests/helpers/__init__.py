"""Test helpers: drivers and reference builders shared by the program tests (not product code)."""
