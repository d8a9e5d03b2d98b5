"""jaxedit benchmarks: `python -m benchmarks.forward` (more hot paths follow with the localization engine)."""
