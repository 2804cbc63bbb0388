"""What the report stage draws and writes: the results read back from disk, the figures, the findings."""
