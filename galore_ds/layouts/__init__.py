"""How a parameter is split across ranks (plain, DTensor, DeepSpeed ZeRO pieces), the one
step skeleton and refresh routine that serve every layout, and the per-layer mode."""
