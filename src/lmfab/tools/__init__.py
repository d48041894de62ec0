"""Tools on top of the library: the muP coordinate check, muTransfer, the Model Zoo importer.

They use config, models and train; nothing below imports them (tests/test_layering.py).
"""
