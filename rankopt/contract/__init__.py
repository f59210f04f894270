"""The plugin contract: hook specifications and the plugin manager.

The base classes live beside their family (``rankopt/plugins/<family>/base.py``, as
Optuna keeps ``samplers/_base.py``) and belong to this layer.
"""
