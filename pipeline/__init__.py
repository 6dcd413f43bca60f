"""notMNIST letters A-J: a reproducible DVC + MLflow pipeline.

stages/ holds one thin module per DVC stage; predict, seeds and verify are the commands a user
runs; data/, training/, evaluation/ and the modules here are the library under them. Imports
point down only (tests/test_layout.py).
"""
