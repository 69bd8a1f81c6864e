"""Analyses built on the methods (the deep-dive's Initial Alignment); above ``methods``."""
