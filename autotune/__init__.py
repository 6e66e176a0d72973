"""The integer-constraint autotuner (``rnnops.autotune``): hardware model, per-kernel search
spaces, ranking, measurement and the persistent per-device cache."""
