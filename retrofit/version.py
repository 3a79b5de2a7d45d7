"""The version and the distribution name, written once (pyproject.toml reads the version here)."""

__all__ = ["__version__", "DISTRIBUTION"]

__version__ = "0.2.0"
# The name this project installs under (`pip install torch-retrofit`); the import name and
# the command are `retrofit`. The distribution called `retrofit` on PyPI is another project.
DISTRIBUTION = "torch-retrofit"
