"""Benchmarks: kernel bandwidth, memory, speed, accuracy and the paper's observation."""
