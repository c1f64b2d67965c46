"""One module per paper experiment: a config dataclass, run(config, out_dir) and report(results, out_dir)."""
