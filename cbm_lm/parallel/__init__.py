"""Device meshes, logical-axis rules and sharding helpers (DESIGN.md section 5)."""
