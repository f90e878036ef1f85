"""Benchmarks of the issue: load time vs safetensors (bench_load), size and codec speed (bench_codecs)."""
