"""The thin CLI layer: one module per subcommand, registered in `app.py`."""
