"""fastbert's benchmark suite: one script per subject, each exposing ``run(device, dtype, quick)``."""
