"""One-off investigations behind figures and decisions in `benchmarks/RESULTS.md` (not product benchmarks)."""
