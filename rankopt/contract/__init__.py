"""The plugin contract: hook specifications, the plugin manager and the base classes of
the plugin families (decomposer, selector, strategy, dataset)."""
