"""CollaFuse: split diffusion between private sites and a shared server."""
