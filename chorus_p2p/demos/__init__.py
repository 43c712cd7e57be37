"""Runnable demonstrations behind ``chorus-node demo``."""
