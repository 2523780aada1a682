"""The lm-eval task of the sweep (YAML + hooks), loaded through include_path."""
