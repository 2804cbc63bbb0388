"""What the evaluate stage measures, as plain functions: sample-quality and likelihood scores, the
worth of the codes, and the metrics behind them."""
