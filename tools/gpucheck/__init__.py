"""tools/gpu-check's parts: one run's machinery (check), what the children see (environment), the steps (steps), the
summary files (summary); the script itself parses the arguments and runs the steps in order."""
