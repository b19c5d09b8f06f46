"""CollaFuse: split diffusion between private sites and a shared server.

The public sampling API (each half takes any ``eps_model(x_t, t) -> eps``):

- :func:`collafuse.diffusion.server_sample`: the server's half, ``x_T`` to the hand-off ``x_tc``;
- :func:`collafuse.diffusion.site_sample`: the site's half, ``x_tc`` to ``x_0``;
- :func:`collafuse.diffusion.ddpm_sample`: the unsplit reference;
- :mod:`collafuse.solvers`: the few-step samplers (DDIM, DPM-Solver++) with the same split
  (``solver_server_half``, ``solver_site_half``, ``solver_sample``; docs/samplers.md).
"""

__version__ = "0.1.0"
