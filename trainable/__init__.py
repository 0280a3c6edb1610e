"""One parameterized trainable for chest X-ray classification ablations."""
