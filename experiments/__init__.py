"""Scripts that turn the paper's claims into rerunnable experiments (see docs/results.md)."""
