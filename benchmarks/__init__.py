"""jaxedit benchmarks: `python -m benchmarks` (the suite), `.forward` (load + forward), `.memory` (sweep memory)."""
